//! Rate limits by backpressure: token buckets per connection, per source address and per
//! relay account, and the per-address connection table (connections and handshakes in
//! progress).
//!
//! A client over its rate is never disconnected: the bucket goes into debt by one token and
//! the connection's reader pauses until the debt is repaid (see `conn::read_loop`), so a
//! fast client is slowed to the configured rate and loses nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handshakes::{Admission, Gate, Handshakes, Ticket};
use crate::store::source_address;

/// Subscription index nodes a publish's routing walk may visit per publish rate token:
/// a publish takes one token, and one more per this many nodes its walk visited
/// ([`walk_tokens`]).
///
/// Why charge the walk: matching follows the exact child and the `+` child at every level
/// (`index`), so a tenant's wildcard filters can make one publish visit tens of thousands of
/// nodes — 41,359 for 1,872 32-level filters whose prefixes all match one path and whose
/// last level never does (the most a tenant's default quota holds) — under the routing
/// shard's lock, which every other key id of that shard waits on. The quotas bound the
/// index's memory, not this work, and the publish rate counted a publish as one token
/// whatever it cost. Charged, walking spends the publisher's own rate budget (connection,
/// address, account) like publishing does: an expensive publisher is slowed — backpressure,
/// never a refusal or a disconnection, and no match is ever skipped — to about the same
/// time under the routing locks per second as a flood of plain publishes at its rate.
///
/// Why 64: measured in a release build (`cargo bench -p whispeer-relay --bench walk`): a
/// node costs 5.7–5.9 ns to walk (41,359 in 235–243 µs); a plain publish to one subscriber
/// spent 0.32 µs under the lock (store append, a 5-node walk, encode, queue offer; timed
/// once around `Router::publish` in session 43); 64 nodes are 0.38 µs. A token
/// thus buys about the same time under the routing lock either way. Honest publishes visit one node per level plus a few `+`
/// branches — fewer than 64 — and are charged exactly as before.
pub(crate) const NODES_PER_TOKEN: usize = 64;

/// The publish rate tokens a routing walk of `nodes` index nodes costs beyond the
/// publish's own one ([`NODES_PER_TOKEN`]).
pub(crate) fn walk_tokens(nodes: usize) -> u64 {
    (nodes / NODES_PER_TOKEN) as u64
}

/// `rate` tokens per second, at most `burst` stored; each request takes one.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate == 0` means unlimited.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Takes one token if available.
    #[cfg(test)]
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed; returns how long the caller must pause
    /// so the debt is repaid (`None`: no pause).
    pub(crate) fn take(&mut self, n: f64, now: Instant) -> Option<Duration> {
        if self.rate == 0.0 {
            return None;
        }
        self.refill(now);
        self.tokens -= n;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// Charges one refused request: refused connects count against an address's connect
    /// rate too, or one holding its cap could connect-and-be-refused at any speed without
    /// ever being in debt (churning, and so banned). The debt refusals run up is capped at
    /// one second's worth, so what an address is owed after it stops stays short.
    pub(crate) fn charge_refused(&mut self, now: Instant) {
        if self.rate == 0.0 {
            return;
        }
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(-self.rate.max(1.0));
    }

    /// Whether a request would find a token (not over the rate), taking none.
    fn has_token(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.rate == 0.0 || (self.tokens + elapsed * self.rate).min(self.burst) >= 1.0
    }

    /// Whether the bucket is in debt: requests are being made faster than its rate.
    fn in_debt(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.rate != 0.0 && self.tokens + elapsed * self.rate < 0.0
    }

    /// Tokens taken and not yet refilled (as of the last take).
    fn spent(&self) -> f64 {
        if self.rate == 0.0 {
            0.0
        } else {
            self.burst - self.tokens
        }
    }

    /// Whether the bucket is full again (an idle address entry can be forgotten).
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.rate == 0.0 || self.tokens + elapsed * self.rate >= self.burst
    }
}

/// What a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `Pub`.
    Publish,
    /// `Sub` / `Unsub`.
    Sub,
    /// `Ack`.
    Ack,
    /// Envelope bytes a publish stored (history or retained value).
    Store,
}

/// `(rate, burst)` of each kind of request, for a bucket set shared by many connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rates {
    pub(crate) publish: (u32, u32),
    pub(crate) sub: (u32, u32),
    pub(crate) ack: (u32, u32),
    /// Stored envelope bytes per second, and their burst.
    pub(crate) store: (u32, u32),
}

/// One bucket per kind of request.
#[derive(Debug)]
pub(crate) struct Buckets {
    publish: TokenBucket,
    sub: TokenBucket,
    ack: TokenBucket,
    store: TokenBucket,
}

impl Buckets {
    pub(crate) fn new(r: Rates, now: Instant) -> Self {
        Self {
            publish: TokenBucket::new(r.publish.0, r.publish.1, now),
            sub: TokenBucket::new(r.sub.0, r.sub.1, now),
            ack: TokenBucket::new(r.ack.0, r.ack.1, now),
            store: TokenBucket::new(r.store.0, r.store.1, now),
        }
    }

    /// Charges `n` requests of `kind`; the pause that repays the debt, if any.
    pub(crate) fn take(&mut self, kind: Kind, n: f64, now: Instant) -> Option<Duration> {
        match kind {
            Kind::Publish => self.publish.take(n, now),
            Kind::Sub => self.sub.take(n, now),
            Kind::Ack => self.ack.take(n, now),
            Kind::Store => self.store.take(n, now),
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        self.publish.is_full(now)
            && self.sub.is_full(now)
            && self.ack.is_full(now)
            && self.store.is_full(now)
    }
}

/// One address's or account's buckets, shared by its connections. Each connection holds
/// its own handle, so charging a request locks only these buckets: no table-wide lock and
/// no keyed hash of the address or account name per message (both were on every `Pub`).
#[derive(Debug, Clone)]
pub(crate) struct SharedBuckets(Arc<Mutex<Buckets>>);

impl SharedBuckets {
    fn new(r: Rates, now: Instant) -> Self {
        Self(Arc::new(Mutex::new(Buckets::new(r, now))))
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charges `n` requests of `kind`; the pause that repays the debt, if any.
    pub(crate) fn take(&self, kind: Kind, n: f64, now: Instant) -> Option<Duration> {
        self.lock().take(kind, n, now)
    }
}

/// Rate buckets shared by every connection of one relay account (auth on), so an account's
/// many connections share one budget. Accounts are listed by the operator, so the table is
/// bounded by the account list.
#[derive(Debug)]
pub(crate) struct AccountRates {
    rates: Rates,
    by_account: Mutex<HashMap<String, SharedBuckets>>,
}

impl AccountRates {
    pub(crate) fn new(rates: Rates) -> Self {
        Self {
            rates,
            by_account: Mutex::new(HashMap::new()),
        }
    }

    /// The buckets of `account` — its identity, `Account::owner` (`account-id:HEX`, or
    /// `account:NAME` for a legacy entry), so a name added again starts full — made on
    /// its first connection and kept while the relay runs (reconnecting never resets
    /// them), for a connection to charge directly.
    pub(crate) fn buckets(&self, account: &str) -> SharedBuckets {
        let mut m = self.by_account.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(account.to_owned())
            .or_insert_with(|| SharedBuckets::new(self.rates, Instant::now()))
            .clone()
    }
}

#[derive(Debug)]
struct AddrEntry {
    /// Connections open or in their handshake from this address.
    conns: usize,
    buckets: SharedBuckets,
    /// New connections (`addr_connect_rate`).
    connects: TokenBucket,
}

impl AddrEntry {
    /// Nothing to remember: no connection and every bucket full again.
    fn forgettable(&self, now: Instant) -> bool {
        self.conns == 0 && self.buckets.lock().is_full(now) && self.connects.is_full(now)
    }
}

#[derive(Debug, Default)]
struct AddrState {
    by_addr: HashMap<IpAddr, AddrEntry>,
    /// Connections and handshakes per network ([`AddrTable::network`]); an entry lives
    /// while its count is not zero, so the map is bounded by the connections.
    by_net: HashMap<IpAddr, usize>,
    total: usize,
    /// Entries at or above which a new address sweeps the forgettable ones: twice what the
    /// last sweep left (at least 4,096), so sweeps cost O(1) per admission amortized. A
    /// fixed 4,096 made every connect from a new address scan the whole table under this
    /// lock once 4,096 addresses held connections.
    sweep_at: usize,
    /// Sweeps so far (tests).
    #[cfg(test)]
    sweeps: usize,
    /// Refused connects per network ([`AddrTable::network`]): every refusal charges its
    /// network's bucket as well as its address's, so a network whose many addresses each
    /// stay under their own connect rate (a /48's 65,536 /64s, each a fresh bucket) is
    /// still churning as a whole. An entry is made by a refusal and forgotten once full.
    net_refusals: HashMap<IpAddr, TokenBucket>,
    /// [`AddrState::sweep_at`] for `net_refusals`.
    net_sweep_at: usize,
    /// Evictions per network (with a network cap): each takes a token of its network's
    /// bucket here, of the same rate and burst as `net_refusals` but apart from it, so
    /// evictions never put the network's refusals in debt (a ban) — and beyond this
    /// bucket a newcomer is refused as on a full relay. Made by an eviction, forgotten
    /// once full.
    net_evictions: HashMap<IpAddr, TokenBucket>,
    /// [`AddrState::sweep_at`] for `net_evictions`.
    net_evict_sweep_at: usize,
}

/// The table size below which no sweep happens.
const SWEEP_MIN: usize = 4096;

/// A network's refused connects may run at this many times an address's connect rate and
/// burst (`addr_connect_rate`, `addr_connect_burst`; defaults 400/s, burst 2,048) before the
/// network counts as churning ([`Refusal::NetworkChurning`]). Only refusals at the
/// network's or an address's cap count (not the relay being full, and none without a network
/// cap): an honest network's connects are never refused while it is under its caps, and one
/// that reaches a
/// cap (a campus or a NAT64 behind one /48, at `max_connections_per_network`) still gets 8
/// addresses' worth of explained refusals — more than the 5 full addresses' worth of places
/// the default network cap is — before its new connects are dropped. A single churning
/// address is banned by its own bucket long before it could put its network in debt.
pub(crate) const NETWORK_CONNECT_FACTOR: u32 = 8;

/// Connections (handshakes included) and rate buckets per source address, plus the global
/// count. Entries outlive their connections until their buckets are full again, so
/// reconnecting does not reset a rate limit.
#[derive(Debug)]
pub(crate) struct AddrTable {
    state: Mutex<AddrState>,
    rates: Rates,
    /// `(rate, burst)` of new connections per address.
    connect: (u32, u32),
    /// Leading bits an IPv6 address is counted by ([`source_address`]).
    v6_prefix: u8,
    per_addr: usize,
    /// Most connections per network (`max_connections_per_network`; 0 = no cap) and the
    /// IPv4 and IPv6 prefix lengths a network is.
    per_net: usize,
    net_prefix: (u8, u8),
    global: usize,
    /// Churning addresses banned before accept.
    bans: crate::syn_ban::Bans,
    /// Churning networks ([`Refusal::NetworkChurning`]), banned at accept: the socket
    /// filter matches single addresses (IPv6: by `v6_prefix`), not networks.
    net_bans: crate::syn_ban::Bans,
    /// The global count, published on every change (sent under the state lock, so
    /// watchers see the changes in order).
    count: tokio::sync::watch::Sender<usize>,
    /// Connections not yet welcomed, oldest first: when the relay is full a newcomer
    /// evicts the oldest instead of being refused ([`crate::handshakes`]).
    handshakes: Arc<Handshakes>,
}

/// Why a new connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The address has `max_connections_per_addr` connections or handshakes.
    PerAddr(usize),
    /// The address's network (IPv4 /24, IPv6 /48 by default) has
    /// `max_connections_per_network` connections or handshakes.
    PerNetwork(usize),
    /// Either cap, reached by an address that is also over its connect rate (connection
    /// churn): the connection is closed at once, without the explanation an honest client
    /// over a cap gets, so a churning address costs the relay as little as possible per
    /// attempt.
    Churning,
    /// The network's or the address's cap (not the global one; and only with a network
    /// cap), reached by an address whose network's refused connects are over
    /// [`NETWORK_CONNECT_FACTOR`] times the connect rate (many addresses of one network
    /// each refused a few times: a /48 rotating its /64s): closed unanswered like
    /// [`Refusal::Churning`], and the network, not only the address, is banned.
    NetworkChurning,
    /// The relay has `max_connections` connections or handshakes.
    Global(usize),
}

impl Refusal {
    /// What the relay tells the refused client (the `tcp` listener sends it in a fatal
    /// `Err(too_many_connections)`), or `None` for a churning address: closed unanswered.
    pub(crate) fn explanation(&self) -> Option<String> {
        match self {
            Refusal::PerAddr(n) => Some(format!(
                "limit of {n} connections per source address reached (max_connections_per_addr)"
            )),
            Refusal::PerNetwork(n) => Some(format!(
                "limit of {n} connections per network of source addresses reached (max_connections_per_network)"
            )),
            Refusal::Global(n) => {
                Some(format!("connection limit of {n} reached (max_connections)"))
            }
            Refusal::Churning | Refusal::NetworkChurning => None,
        }
    }

    /// Which cap refused (the `cap` label of `whispeer_relay_connections_refused_total`).
    pub(crate) fn cap(&self) -> crate::metrics::RefusedCap {
        use crate::metrics::RefusedCap;
        match self {
            Refusal::PerAddr(_) => RefusedCap::PerAddr,
            Refusal::PerNetwork(_) => RefusedCap::PerNetwork,
            Refusal::Global(_) => RefusedCap::Global,
            Refusal::Churning | Refusal::NetworkChurning => RefusedCap::Churning,
        }
    }
}

impl AddrTable {
    pub(crate) fn new(
        rates: Rates,
        connect: (u32, u32),
        v6_prefix: u8,
        per_addr: usize,
        global: usize,
        ban_max: Duration,
    ) -> Self {
        Self {
            state: Mutex::new(AddrState::default()),
            rates,
            connect,
            v6_prefix,
            per_addr,
            per_net: 0,
            net_prefix: (32, 128),
            global,
            bans: crate::syn_ban::Bans::new(ban_max),
            net_bans: crate::syn_ban::Bans::new(ban_max),
            count: tokio::sync::watch::Sender::new(0),
            handshakes: Arc::new(Handshakes::new(
                Arc::new(crate::metrics::Metrics::new()),
                Duration::ZERO,
            )),
        }
    }

    /// Shares `handshakes` with the registry, so the two gates evict alike.
    pub(crate) fn with_handshakes(mut self, handshakes: Arc<Handshakes>) -> Self {
        self.handshakes = handshakes;
        self
    }

    /// Caps the connections of each network at `cap` (0 = no cap): an IPv4 address's
    /// first `v4_prefix` bits, an IPv6 one's first `v6_prefix` (at most the table's
    /// per-address prefix, so a network holds whole sources).
    pub(crate) fn with_network_cap(mut self, cap: usize, v4_prefix: u8, v6_prefix: u8) -> Self {
        self.per_net = cap;
        self.net_prefix = (v4_prefix.min(32), v6_prefix.min(self.v6_prefix));
        self
    }

    /// The network `ip` counts in (for the caps and the eviction's fair share).
    pub(crate) fn network_of(&self, ip: IpAddr) -> IpAddr {
        self.network(source_address(ip, self.v6_prefix))
    }

    /// The network a source address (already cut by [`source_address`]) counts in.
    fn network(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(self.net_prefix.0);
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(_) => source_address(ip, self.net_prefix.1),
        }
    }

    /// The banned addresses.
    pub(crate) fn bans(&self) -> &crate::syn_ban::Bans {
        &self.bans
    }

    /// `ip` was refused as [`Refusal::Churning`]: bans it before accept unless it already
    /// is ([`crate::syn_ban`]). Returns the new ban's length.
    pub(crate) fn strike(&self, ip: IpAddr) -> Option<Duration> {
        self.bans
            .strike(source_address(ip, self.v6_prefix), Instant::now())
    }

    /// `ip` was refused as [`Refusal::NetworkChurning`]: bans its network at accept unless
    /// it already is. Returns the network and the new ban's length.
    pub(crate) fn strike_network(&self, ip: IpAddr) -> Option<(IpAddr, Duration)> {
        let net = self.network(source_address(ip, self.v6_prefix));
        self.net_bans.strike(net, Instant::now()).map(|d| (net, d))
    }

    /// Whether `ip`'s source address, or its network, is banned now for churn.
    pub(crate) fn banned(&self, ip: IpAddr) -> bool {
        self.banned_at(ip, Instant::now())
    }

    fn banned_at(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = source_address(ip, self.v6_prefix);
        self.bans.banned(ip, now) || self.net_bans.banned(self.network(ip), now)
    }

    /// Leading bits an IPv6 address is counted (and banned) by.
    pub(crate) fn v6_prefix(&self) -> u8 {
        self.v6_prefix
    }

    /// Watches the count of connections and handshakes (see [`RelayHandle::connections`](crate::RelayHandle::connections)).
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<usize> {
        self.count.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, AddrState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip` (counted from accept, through its handshake, until
    /// the returned slot drops). Over the address's connect rate the slot says how long
    /// the handshake must wait ([`AddrSlot::wait`]); the wait is bounded, since every
    /// waiting connection holds one of the address's `per_addr` places.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<AddrSlot, Refusal> {
        self.admit_at(ip, Instant::now())
    }

    /// [`AddrTable::admit`] at time `now`.
    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<AddrSlot, Refusal> {
        let ip = source_address(ip, self.v6_prefix);
        let mut s = self.lock();
        if s.by_addr.len() >= s.sweep_at.max(SWEEP_MIN) && !s.by_addr.contains_key(&ip) {
            s.by_addr.retain(|_, e| !e.forgettable(now));
            s.sweep_at = (2 * s.by_addr.len()).max(SWEEP_MIN);
            #[cfg(test)]
            {
                s.sweeps += 1;
            }
        }
        let (rates, (rate, burst)) = (self.rates, self.connect);
        // The relay is full (places held by evicted connections that are still closing do
        // not count), but a connection not yet welcomed holds a place: the newcomer may take
        // the fair-share victim's place ([`crate::handshakes`]) — once it passed every other
        // check below, which it pays as any connection does, and only within its address's
        // connect rate — and that one is closed. Decided under one lock of the queues, held
        // to the end: the registry cannot evict the victim meanwhile.
        let mut queues = self.handshakes.lock();
        let admission = queues.admission(Gate::Table, s.total, self.global, now);
        let global = admission == Admission::Refuse;
        let net = self.network(ip);
        let net_full = self.per_net > 0 && s.by_net.get(&net).copied().unwrap_or(0) >= self.per_net;
        let s = &mut *s;
        // A refusal at the network's or the address's cap charges the network too, before
        // the address gets an entry: once the network's refusals are in debt its addresses
        // are closed unanswered (no task spawned to explain) and remembered nowhere but in
        // the network's bucket and ban. Not a refusal because the relay is full (`global`):
        // that is no doing of the network, whose many honest hosts (a /48 enterprise pool,
        // a carrier-grade NAT) all reconnecting while the relay is full must not get it
        // banned. Nor with no network cap (`per_net` 0): the operator said one network
        // really brings that many clients.
        let at_addr_cap = s.by_addr.get(&ip).is_some_and(|e| e.conns >= self.per_addr);
        if self.per_net > 0
            && !global
            && (net_full || at_addr_cap)
            && self.charge_network(s, net, now)
        {
            return Err(Refusal::NetworkChurning);
        }
        // Whether the network's eviction bucket has a token for an eviction (below).
        let net_token = self.per_net == 0
            || !matches!(admission, Admission::Evict(_))
            || s.net_evictions.get(&net).is_none_or(|b| b.has_token(now));
        let e = s.by_addr.entry(ip).or_insert_with(|| AddrEntry {
            conns: 0,
            buckets: SharedBuckets::new(rates, now),
            connects: TokenBucket::new(rate, burst, now),
        });
        if global {
            e.connects.charge_refused(now);
            return Err(if e.connects.in_debt(now) {
                Refusal::Churning
            } else {
                Refusal::Global(self.global)
            });
        }
        if e.conns >= self.per_addr {
            e.connects.charge_refused(now);
            return Err(if e.connects.in_debt(now) {
                Refusal::Churning
            } else {
                Refusal::PerAddr(self.per_addr)
            });
        }
        // The network's cap: refusals charge the address's connect rate like the others,
        // so an address that keeps connecting into a full network is churning (banned by
        // its own address). The whole network is banned only when its refusals together
        // are in debt (above): many addresses churning, not one.
        if net_full {
            e.connects.charge_refused(now);
            return Err(if e.connects.in_debt(now) {
                Refusal::Churning
            } else {
                Refusal::PerNetwork(self.per_net)
            });
        }
        if let Admission::Evict(victim) = &admission {
            // Evicting is connecting to a full relay: over its connect rate the address is
            // refused as when nothing could be evicted (charged: churning, then banned),
            // not let in to wait — its wait came after the victim was already gone, so one
            // address could evict every handshake at any speed. Likewise over its
            // network's eviction rate (with a network cap: `NETWORK_CONNECT_FACTOR`
            // addresses' rate, in a bucket of its own): many addresses of one network
            // evict no faster than that, and the rest are refused as on a full relay
            // (`Global`, the address charged) — not as `NetworkChurning`: a full relay is
            // no doing of the network, whose many honest hosts (a carrier NAT, a /48 pool)
            // reconnecting into it after a restart must not get it banned. Nor do its
            // evictions spend the bucket of its refusals at the caps, whose debt bans it:
            // 24 evictions then made one refusal at an address's cap a network ban.
            if !e.connects.has_token(now) || !net_token {
                e.connects.charge_refused(now);
                return Err(if e.connects.in_debt(now) {
                    Refusal::Churning
                } else {
                    Refusal::Global(self.global)
                });
            }
            if self.per_net > 0 {
                // Has a token (checked above).
                let (map, sweep_at) = (&mut s.net_evictions, &mut s.net_evict_sweep_at);
                self.network_bucket(map, sweep_at, net, now)
                    .charge_refused(now);
            }
            queues.evict(victim);
        }
        let e = s.by_addr.get_mut(&ip).expect("the entry made above");
        e.conns += 1;
        let wait = e.connects.take(1.0, now);
        let busy = e.connects.spent() > LIGHT_CONNECTS || e.conns as f64 > LIGHT_CONNECTS;
        let buckets = e.buckets.clone();
        if self.per_net > 0 {
            *s.by_net.entry(net).or_insert(0) += 1;
        }
        s.total += 1;
        self.count.send_replace(s.total);
        let ticket = self.handshakes.ticket(Some(net), now);
        queues.enter(Gate::Table, &ticket);
        Ok(AddrSlot {
            table: self.clone(),
            ticket,
            ip,
            buckets,
            wait,
            busy,
        })
    }

    /// Charges a refused connect to `net`'s bucket; whether the network is now in debt.
    fn charge_network(&self, s: &mut AddrState, net: IpAddr, now: Instant) -> bool {
        let b = self.network_bucket(&mut s.net_refusals, &mut s.net_sweep_at, net, now);
        b.charge_refused(now);
        b.in_debt(now)
    }

    /// `net`'s bucket in `map` (`NETWORK_CONNECT_FACTOR` addresses' connect rate and
    /// burst), made if need be; a new entry first sweeps the full ones once `map` reached
    /// `sweep_at` (then twice what is left, as [`AddrState::sweep_at`]).
    fn network_bucket<'m>(
        &self,
        map: &'m mut HashMap<IpAddr, TokenBucket>,
        sweep_at: &mut usize,
        net: IpAddr,
        now: Instant,
    ) -> &'m mut TokenBucket {
        if map.len() >= (*sweep_at).max(SWEEP_MIN) && !map.contains_key(&net) {
            map.retain(|_, b| !b.is_full(now));
            *sweep_at = (2 * map.len()).max(SWEEP_MIN);
        }
        let (rate, burst) = self.connect;
        map.entry(net).or_insert_with(|| {
            TokenBucket::new(
                rate.saturating_mul(NETWORK_CONNECT_FACTOR),
                burst.saturating_mul(NETWORK_CONNECT_FACTOR),
                now,
            )
        })
    }

    fn release(&self, ip: IpAddr, ticket: &Arc<Ticket>) {
        let now = Instant::now();
        let mut s = self.lock();
        self.handshakes.leave(Gate::Table, ticket);
        s.total = s.total.saturating_sub(1);
        self.count.send_replace(s.total);
        if self.per_net > 0 {
            let net = self.network(ip);
            if let Some(n) = s.by_net.get_mut(&net) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.by_net.remove(&net);
                }
            }
        }
        if let Some(e) = s.by_addr.get_mut(&ip) {
            e.conns = e.conns.saturating_sub(1);
            if e.forgettable(now) {
                s.by_addr.remove(&ip);
            }
        }
    }

    /// Connections and handshakes counted now (for tests and status).
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.lock().total
    }
}

/// One admitted connection's place in the [`AddrTable`]; released on drop.
#[derive(Debug)]
pub(crate) struct AddrSlot {
    table: Arc<AddrTable>,
    /// Its place among the connections not yet welcomed (evictable while it is there).
    ticket: Arc<Ticket>,
    ip: IpAddr,
    /// The address's buckets (the table's entry lives at least as long as this slot).
    buckets: SharedBuckets,
    wait: Option<Duration>,
    busy: bool,
}

/// Connections an address may have opened recently (within its connect bucket's memory:
/// `addr_connect_burst ÷ addr_connect_rate` seconds) or hold at once and still have a new
/// one start on the relay's light runtime (`hop`): a client's few connections do; an
/// address that churns or opens many starts them on the main runtime.
const LIGHT_CONNECTS: f64 = 8.0;

impl AddrSlot {
    /// The connection's ticket among those not yet welcomed ([`crate::handshakes`]).
    pub(crate) fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }

    /// How long this connection's handshake waits: the address is over its connect rate.
    pub(crate) fn wait(&self) -> Option<Duration> {
        self.wait
    }

    /// Whether the address opened or holds more than a client's few connections: this
    /// one then starts on the main runtime, not the light one (`hop`).
    pub(crate) fn busy(&self) -> bool {
        self.busy
    }

    /// The source address this connection counts against (an IPv6 address cut to
    /// `addr_ipv6_prefix`): the key of every per-address limit, the large-frame budget's
    /// share included.
    pub(crate) fn addr(&self) -> IpAddr {
        self.ip
    }

    /// Charges `n` requests of `kind` to the address.
    pub(crate) fn take(&self, kind: Kind, n: f64, now: Instant) -> Option<Duration> {
        self.buckets.take(kind, n, now)
    }
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        self.table.release(self.ip, &self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNLIMITED: Rates = Rates {
        publish: (0, 0),
        sub: (0, 0),
        ack: (0, 0),
        store: (0, 0),
    };

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        let mut unlimited = TokenBucket::new(0, 0, t0);
        assert!((0..1000).all(|_| unlimited.try_take(t0)));
    }

    #[test]
    fn debt_gives_the_pause_that_repays_it() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert_eq!(b.take(1.0, t0), None);
        assert_eq!(b.take(1.0, t0), None);
        let wait = b.take(1.0, t0).unwrap();
        assert_eq!(wait, Duration::from_millis(100));
        // After the pause the debt is repaid and the next token needs another pause.
        let wait2 = b.take(1.0, t0 + wait).unwrap();
        assert_eq!(wait2, Duration::from_millis(100));
        assert_eq!(TokenBucket::new(0, 0, t0).take(1e9, t0), None);
    }

    #[test]
    fn an_account_shares_one_budget_per_kind() {
        let t0 = Instant::now();
        let a = AccountRates::new(Rates {
            publish: (10, 2),
            sub: (0, 0),
            ack: (10, 1),
            store: (1000, 500),
        });
        // Stored bytes: a burst of 500, then 1,000 a second.
        assert_eq!(a.buckets("alice").take(Kind::Store, 400.0, t0), None);
        assert_eq!(
            a.buckets("alice").take(Kind::Store, 200.0, t0),
            Some(Duration::from_millis(100))
        );
        assert_eq!(a.buckets("alice").take(Kind::Publish, 2.0, t0), None);
        // Another connection of alice's shares the empty bucket; bob has his own.
        assert_eq!(
            a.buckets("alice").take(Kind::Publish, 1.0, t0),
            Some(Duration::from_millis(100))
        );
        assert_eq!(a.buckets("bob").take(Kind::Publish, 2.0, t0), None);
        assert_eq!(
            a.buckets("alice").take(Kind::Sub, 1e6, t0),
            None,
            "0 = unlimited"
        );
        assert_eq!(a.buckets("alice").take(Kind::Ack, 1.0, t0), None);
        assert!(a.buckets("alice").take(Kind::Ack, 1.0, t0).is_some());
    }

    #[test]
    fn addresses_are_capped_and_counted_until_released() {
        let t = Arc::new(AddrTable::new(UNLIMITED, (0, 0), 64, 2, 3, Duration::ZERO));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = welcomed(&t, t.admit(a).unwrap());
        let _s2 = welcomed(&t, t.admit(a).unwrap());
        assert_eq!(t.admit(a).unwrap_err(), Refusal::PerAddr(2));
        let _s3 = welcomed(&t, t.admit(b).unwrap());
        assert_eq!(t.admit(b).unwrap_err(), Refusal::Global(3));
        drop(s1);
        assert_eq!(t.total(), 2);
        let _s4 = t.admit(a).unwrap();
    }

    /// A slot whose connection was welcomed (past `Hello`): never evicted.
    fn welcomed(t: &AddrTable, slot: AddrSlot) -> AddrSlot {
        assert!(t.handshakes.pass(slot.ticket()));
        slot
    }

    /// The relay full, a newcomer takes the place of the oldest connection not yet
    /// welcomed (its place stops counting at once; its address's place is held until it
    /// closes), never of a welcomed one; with none left it is refused. The newcomer still
    /// pays its address's cap.
    #[test]
    fn a_full_table_evicts_the_oldest_unwelcomed_connection() {
        let t = Arc::new(AddrTable::new(UNLIMITED, (0, 0), 64, 2, 3, Duration::ZERO));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let held = welcomed(&t, t.admit(ip("10.0.0.1")).unwrap());
        let old = t.admit(ip("10.0.0.2")).unwrap();
        let young = t.admit(ip("10.0.0.2")).unwrap();
        // 10.0.0.2 is at its cap: refused, nothing evicted.
        assert_eq!(t.admit(ip("10.0.0.2")).unwrap_err(), Refusal::PerAddr(2));
        assert!(!old.ticket().is_evicted());
        let new = t.admit(ip("10.0.0.3")).unwrap();
        assert!(old.ticket().is_evicted() && !young.ticket().is_evicted());
        assert_eq!(t.total(), 4, "the evicted one is counted until it closes");
        // Still at its cap while the evicted connection closes.
        assert_eq!(t.admit(ip("10.0.0.2")).unwrap_err(), Refusal::PerAddr(2));
        drop(old);
        let _new2 = t.admit(ip("10.0.0.4")).unwrap();
        assert!(young.ticket().is_evicted());
        let _new = welcomed(&t, new);
        let _new2 = welcomed(&t, _new2);
        assert_eq!(t.admit(ip("10.0.0.5")).unwrap_err(), Refusal::Global(3));
        drop((held, young));
        assert_eq!(t.total(), 2);
        assert_eq!(t.handshakes.lingering(Gate::Table), 0);
    }

    /// Review finding (High): nothing capped the places of evicted connections still
    /// closing, so a newcomer could always evict and the relay's sockets grew with the
    /// connect rate. Four unwelcomed places of 4, then 100 newcomers from other addresses,
    /// every slot kept: 16 are admitted (each evicting one) up to the ceiling of
    /// 4 + 16 places, lingering included; the other 84 are refused as when full. Once
    /// evicted connections close, newcomers evict again.
    #[test]
    fn evicted_connections_still_closing_are_capped() {
        let t = Arc::new(AddrTable::new(
            UNLIMITED,
            (0, 0),
            64,
            1_000,
            4,
            Duration::ZERO,
        ));
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let held: Vec<_> = (0..4).map(|i| t.admit(ip(i)).unwrap()).collect();
        let (mut admitted, mut refused) = (Vec::new(), 0);
        for i in 0..100 {
            match t.admit(ip(1_000 + i)) {
                Ok(slot) => admitted.push(slot),
                Err(why) => {
                    assert_eq!(why, Refusal::Global(4));
                    refused += 1;
                }
            }
            assert!(t.total() <= crate::handshakes::ceiling(4), "{}", t.total());
        }
        assert_eq!((admitted.len(), refused), (16, 84));
        assert_eq!(t.total(), 20);
        assert!(held.iter().all(|s| s.ticket().is_evicted()));
        drop(held);
        let _late = t.admit(ip(5_000)).unwrap();
        assert_eq!(t.total(), 17);
    }

    /// Review finding (High): evicting bypassed the connect rate and the churn ban, so one
    /// address connecting fast evicted every handshake. Connect rate 1/s, burst 3; four
    /// places held by 10.0.1.x (two admitted 10 s ago, two 1 s ago: within the 2 s grace).
    /// 10.0.0.9 connects 5 times at once: it evicts the two old ones (its network holds
    /// fewer), then the victim is within its grace: refused (Global, charged), then over
    /// its rate: churning. 1.5 s later the old-enough victim is there but 10.0.0.9 has no
    /// token: churning still; 10.0.2.1, within its rate, evicts it.
    #[test]
    fn an_evictor_pays_its_connect_rate_and_spares_young_handshakes() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let t = Arc::new(
            AddrTable::new(UNLIMITED, (1, 3), 64, 100, 4, Duration::from_secs(60))
                .with_network_cap(100, 24, 48)
                .with_handshakes(Arc::new(Handshakes::new(metrics, Duration::from_secs(2)))),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let held = [
            t.admit_at(ip("10.0.1.1"), at(0)).unwrap(),
            t.admit_at(ip("10.0.1.2"), at(0)).unwrap(),
            t.admit_at(ip("10.0.1.3"), at(9_000)).unwrap(),
            t.admit_at(ip("10.0.1.4"), at(9_000)).unwrap(),
        ];
        let flooder = ip("10.0.0.9");
        let kept: Vec<_> = (0..5).map(|_| t.admit_at(flooder, at(10_000))).collect();
        assert_eq!(
            kept.iter()
                .map(|r| r.as_ref().map(|_| ()).map_err(|e| *e))
                .collect::<Vec<_>>(),
            [
                Ok(()),
                Ok(()),
                Err(Refusal::Global(4)),
                Err(Refusal::Churning),
                Err(Refusal::Churning)
            ]
        );
        let evicted: Vec<_> = held.iter().map(|s| s.ticket().is_evicted()).collect();
        assert_eq!(evicted, [true, true, false, false]);
        assert_eq!(
            t.admit_at(flooder, at(11_500)).unwrap_err(),
            Refusal::Churning
        );
        assert!(!held[2].ticket().is_evicted());
        let _honest = t.admit_at(ip("10.0.2.1"), at(11_500)).unwrap();
        assert!(held[2].ticket().is_evicted() && !held[3].ticket().is_evicted());
    }

    /// Evictions from one network beyond its connect bucket (with a network cap) are
    /// refused as on a full relay (`Global`), never `NetworkChurning`: an honest carrier
    /// /24 reconnecting into a full relay must not get its network banned. Rate 1/s burst
    /// 3 (network bucket 8/s burst 24), global 40 held by old unwelcomed connections of
    /// 10.0.0.x; 30 newcomers from distinct 10.0.0.y at one instant: 24 evict, 6 are
    /// refused `Global`, none evicting; a second later (8 network tokens back) one evicts
    /// again. Fails without: the 25th and later were `NetworkChurning`.
    /// The address 10.0.0.`i`.
    fn ten(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    /// A table of 40 places (connect rate 1/s burst 3, network cap 100 of /24s, `per_addr`
    /// per address) held by unwelcomed connections of 10.0.0.1–40 admitted at t0; and
    /// t0 + 10 s, when they are all past their grace (2 s).
    fn full_of_old_handshakes(per_addr: usize) -> (Arc<AddrTable>, Vec<AddrSlot>, Instant) {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let t = Arc::new(
            AddrTable::new(UNLIMITED, (1, 3), 64, per_addr, 40, Duration::from_secs(60))
                .with_network_cap(100, 24, 48)
                .with_handshakes(Arc::new(Handshakes::new(metrics, Duration::from_secs(2)))),
        );
        let t0 = Instant::now();
        let held = (1..=40).map(|i| t.admit_at(ten(i), t0).unwrap()).collect();
        (t, held, t0 + Duration::from_secs(10))
    }

    #[test]
    fn evictions_over_the_networks_rate_are_refused_as_global_not_banned() {
        let (t, mut held, later) = full_of_old_handshakes(100);
        let ip = ten;
        let mut outcomes = Vec::new();
        for i in 0..30 {
            let r = t.admit_at(ip(100 + i), later);
            outcomes.push(r.as_ref().map(|_| ()).map_err(|e| *e));
            held.extend(r.ok());
            // The evicted close at once (their lingering places are not the point here).
            held.retain(|s| !s.ticket().is_evicted());
        }
        let mut expected = vec![Ok(()); 24];
        expected.extend([Err(Refusal::Global(40)); 6]);
        assert_eq!(outcomes, expected);
        assert_eq!(held.len(), 40);
        let newest = t
            .admit_at(ip(200), later + Duration::from_secs(1))
            .expect("the network's bucket refilled: evicts again");
        assert_eq!(held.iter().filter(|s| s.ticket().is_evicted()).count(), 1);
        drop(newest);
    }

    /// Review finding (Low): evictions took their tokens from the network bucket whose debt
    /// bans the network, so 24 evictions (8 × burst 3) emptied it and one refusal at an
    /// address's cap from that network then put it in debt: `NetworkChurning`, the whole
    /// network banned, where the bucket's burst would have absorbed that refusal. Evictions
    /// have their own network bucket now (same rate and burst). The table above with
    /// `per_addr` 1: after the 24 evictions from 10.0.0.x, an address of that network that
    /// already holds its place connects again: `PerAddr`, the network not banned.
    #[test]
    fn evictions_leave_the_networks_refusal_bucket_alone() {
        let (t, mut held, later) = full_of_old_handshakes(1);
        let ip = ten;
        for i in 0..24 {
            held.push(t.admit_at(ip(100 + i), later).expect("evicts"));
            held.retain(|s| !s.ticket().is_evicted());
        }
        assert_eq!(held.len(), 40);
        assert_eq!(t.admit_at(ip(123), later).unwrap_err(), Refusal::PerAddr(1));
        assert!(!t.banned_at(ip(123), later));
        assert!(!t.banned_at(ip(7), later));
        // Evictions are still held to the network's rate: the next is refused as `Global`.
        assert_eq!(t.admit_at(ip(150), later).unwrap_err(), Refusal::Global(40));
        drop(held);
    }

    #[test]
    fn an_ipv6_host_is_one_source_across_its_slash_64() {
        let t = Arc::new(AddrTable::new(
            UNLIMITED,
            (0, 0),
            64,
            2,
            100,
            Duration::ZERO,
        ));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = t.admit(ip("2001:db8:0:1::1")).unwrap();
        let _b = t.admit(ip("2001:db8:0:1:dead:beef::2")).unwrap();
        // A third interface id in the same /64 is the same source: capped.
        assert_eq!(
            t.admit(ip("2001:db8:0:1:ffff:ffff:ffff:ffff")).unwrap_err(),
            Refusal::PerAddr(2)
        );
        // The next /64 is another source.
        let _c = t.admit(ip("2001:db8:0:2::1")).unwrap();
        // An IPv4 client is the same source mapped into IPv6 or not.
        let _d = t.admit(ip("10.0.0.1")).unwrap();
        let _e = t.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(t.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerAddr(2));
    }

    #[test]
    fn connections_over_the_connect_rate_wait_and_reconnecting_does_not_reset_it() {
        let t = Arc::new(AddrTable::new(
            UNLIMITED,
            (10, 2),
            64,
            100,
            1000,
            Duration::ZERO,
        ));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The burst arrives at once; the next waits a token's time (100 ms).
        let s1 = t.admit_at(a, t0).unwrap();
        let s2 = t.admit_at(a, t0).unwrap();
        assert_eq!((s1.wait(), s2.wait()), (None, None));
        let s3 = t.admit_at(a, t0).unwrap();
        assert_eq!(s3.wait(), Some(ms(100)));
        // Hanging up and coming back does not forget the debt (the entry is kept while a
        // bucket is not full): 50 ms later the bucket is still half a token short, so the
        // next connection waits that plus its own token.
        drop((s1, s2, s3));
        let s4 = t.admit_at(a, t0 + ms(50)).unwrap();
        assert_eq!(s4.wait(), Some(ms(150)));
        // Over the per-address cap while in debt: churning.
        let capped = Arc::new(AddrTable::new(
            UNLIMITED,
            (10, 1),
            64,
            2,
            1000,
            Duration::ZERO,
        ));
        let _c1 = capped.admit_at(a, t0).unwrap();
        let _c2 = capped.admit_at(a, t0).unwrap();
        assert_eq!(capped.admit_at(a, t0).unwrap_err(), Refusal::Churning);
        // Once the debt is repaid (the refusal above cost a token too), a refusal is the
        // plain cap again; refusals faster than the rate are churn again.
        assert_eq!(
            capped.admit_at(a, t0 + ms(300)).unwrap_err(),
            Refusal::PerAddr(2)
        );
        assert_eq!(
            capped.admit_at(a, t0 + ms(300)).unwrap_err(),
            Refusal::Churning
        );
        // At the global cap too: the churning address is closed, another is told why.
        let full = Arc::new(AddrTable::new(
            UNLIMITED,
            (10, 1),
            64,
            100,
            2,
            Duration::ZERO,
        ));
        let _f1 = welcomed(&full, full.admit_at(a, t0).unwrap());
        let _f2 = welcomed(&full, full.admit_at(a, t0).unwrap());
        assert_eq!(full.admit_at(a, t0).unwrap_err(), Refusal::Churning);
        assert_eq!(full.admit_at(b, t0).unwrap_err(), Refusal::Global(2));
        // Another address has its own bucket.
        assert_eq!(t.admit_at(b, t0).unwrap().wait(), None);
        // 0 = unlimited.
        let free = Arc::new(AddrTable::new(
            UNLIMITED,
            (0, 0),
            64,
            100,
            1000,
            Duration::ZERO,
        ));
        let slots: Vec<_> = (0..50).map(|_| free.admit_at(a, t0).unwrap()).collect();
        assert!(slots.iter().all(|s| s.wait().is_none()));
    }

    /// Above the per-address cap, a network (IPv4 /24, IPv6 /48 here) is capped over all its
    /// addresses; a slot released frees the network's place; another network is unaffected;
    /// an address that keeps connecting into a full network is churning.
    #[test]
    fn networks_are_capped_over_all_their_addresses() {
        let t = Arc::new(
            AddrTable::new(UNLIMITED, (10, 3), 64, 2, 1000, Duration::ZERO)
                .with_network_cap(3, 24, 48),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t0 = Instant::now();
        let a1 = t.admit_at(ip("10.0.1.1"), t0).unwrap();
        let _a2 = t.admit_at(ip("10.0.1.2"), t0).unwrap();
        let _a3 = t.admit_at(ip("10.0.1.3"), t0).unwrap();
        // A fourth address of the /24, under its own cap: the network's cap.
        assert_eq!(
            t.admit_at(ip("10.0.1.4"), t0).unwrap_err(),
            Refusal::PerNetwork(3)
        );
        // Mapped into IPv6 it is the same network.
        assert_eq!(
            t.admit_at(ip("::ffff:10.0.1.5"), t0).unwrap_err(),
            Refusal::PerNetwork(3)
        );
        // The per-address cap is still named first when it is the one reached.
        let _b1 = t.admit_at(ip("10.0.2.1"), t0).unwrap();
        let _b2 = t.admit_at(ip("10.0.2.1"), t0).unwrap();
        assert_eq!(
            t.admit_at(ip("10.0.2.1"), t0).unwrap_err(),
            Refusal::PerAddr(2)
        );
        // Released: the network has a place again.
        drop(a1);
        let _a4 = t.admit_at(ip("10.0.1.4"), t0).unwrap();
        // IPv6: three /64s of one /48 fill it; a /64 of the next /48 is another network.
        let _c1 = t.admit_at(ip("2001:db8:1:1::1"), t0).unwrap();
        let _c2 = t.admit_at(ip("2001:db8:1:2::1"), t0).unwrap();
        let _c3 = t.admit_at(ip("2001:db8:1:ff00::1"), t0).unwrap();
        assert_eq!(
            t.admit_at(ip("2001:db8:1:ffff::1"), t0).unwrap_err(),
            Refusal::PerNetwork(3)
        );
        let _d1 = t.admit_at(ip("2001:db8:2::1"), t0).unwrap();
        // An address that keeps connecting into the full network runs into debt (its
        // refusals cost its connect bucket, burst 3): churning, banned by its address.
        let churner = ip("10.0.1.9");
        let refusals: Vec<_> = (0..5)
            .map(|_| t.admit_at(churner, t0).unwrap_err())
            .collect();
        assert_eq!(refusals[0], Refusal::PerNetwork(3));
        assert_eq!(refusals[4], Refusal::Churning);
        // Every place given back: nothing left counted per network.
        drop((_a2, _a3, _a4, _c1, _c2, _c3, _d1, _b1, _b2));
        assert!(t.lock().by_net.is_empty());
        assert_eq!(t.total(), 0);
        // 0 = no network cap (the per-address cap still holds).
        let off = Arc::new(
            AddrTable::new(UNLIMITED, (0, 0), 64, 2, 1000, Duration::ZERO)
                .with_network_cap(0, 24, 48),
        );
        let held: Vec<_> = (1..=50)
            .map(|i| off.admit_at(ip(&format!("10.0.1.{i}")), t0).unwrap())
            .collect();
        assert!(off.lock().by_net.is_empty());
        drop(held);
    }

    /// A /48 rotating its /64s into its full network: each /64 is a fresh address with a
    /// full connect bucket, so its refusals were explained (a task spawned per connect by
    /// the `tcp` listener) ~256 times per /64 — 65,536 /64s — and never churning, nor
    /// banned. Now the refusals also charge the network's bucket (8 × an address's): once
    /// it is in debt the network is churning, its addresses closed unanswered and banned
    /// as a network, while another /48 is unaffected.
    #[test]
    fn a_network_rotating_its_addresses_into_its_cap_is_churning() {
        let (rate, burst) = (50, 256);
        let t = Arc::new(
            AddrTable::new(
                UNLIMITED,
                (rate, burst),
                64,
                256,
                100_000,
                Duration::from_secs(60),
            )
            .with_network_cap(4, 24, 48),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t0 = Instant::now();
        // The network's cap filled by one host.
        let held: Vec<_> = (0..4)
            .map(|_| t.admit_at(ip("2001:db8:7:1::1"), t0).unwrap())
            .collect();
        // 10,000 distinct /64s of that /48, one connect each, over one second.
        let mut explained = 0;
        let mut churning = None;
        for i in 0..10_000u32 {
            let at = t0 + Duration::from_micros(100 * u64::from(i));
            let a = IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                7,
                (i + 2) as u16,
                0,
                0,
                0,
                1,
            ));
            match t.admit_at(a, at).unwrap_err() {
                Refusal::PerNetwork(4) => explained += 1,
                Refusal::NetworkChurning => {
                    churning.get_or_insert((i, a, at));
                }
                other => panic!("{a}: {other:?}"),
            }
        }
        let (first, churner, at) = churning.expect("never churning: one /48 rotating /64s");
        // The network's burst (2,048) and what its rate refilled meanwhile, no more.
        let most = f64::from(burst * NETWORK_CONNECT_FACTOR)
            + f64::from(rate * NETWORK_CONNECT_FACTOR) * 1e-4 * f64::from(first)
            + 1.0;
        assert!(
            f64::from(explained) <= most,
            "{explained} refusals explained (at most {most})"
        );
        assert_eq!(
            explained, first,
            "every refusal after the first is unanswered"
        );
        // Nothing remembered per address once the network is in debt.
        assert!(t.lock().by_addr.len() <= first as usize + 1);
        // Struck: the whole /48 is banned at accept, any /64 of it; its /64 alone is not
        // an address ban.
        let (net, length) = t.strike_network(churner).unwrap();
        assert_eq!(net, ip("2001:db8:7::"));
        assert_eq!(length, Duration::from_secs(1));
        assert!(t.banned_at(ip("2001:db8:7:ffff::9"), at));
        assert!(!t.bans().banned(ip("2001:db8:7:ffff::"), at));
        // Another /48 — and an IPv4 address — are unaffected: admitted at once, not
        // banned, the network cap's explanation still theirs.
        assert!(!t.banned_at(ip("2001:db8:8:1::1"), at));
        assert!(!t.banned_at(ip("192.0.2.1"), at));
        let honest = t.admit_at(ip("2001:db8:8:1::1"), at).unwrap();
        assert_eq!(honest.wait(), None);
        let other: Vec<_> = (0..3)
            .map(|_| t.admit_at(ip("2001:db8:8:2::1"), at).unwrap())
            .collect();
        assert_eq!(
            t.admit_at(ip("2001:db8:8:3::1"), at).unwrap_err(),
            Refusal::PerNetwork(4)
        );
        drop((held, honest, other));
    }

    /// An honest network at its cap — clients of many hosts behind one /48 retrying — at
    /// several addresses' connect rate is told why each time, never churning.
    #[test]
    fn an_honest_network_at_its_cap_is_not_churning() {
        let t = Arc::new(
            AddrTable::new(
                UNLIMITED,
                (50, 256),
                64,
                256,
                100_000,
                Duration::from_secs(60),
            )
            .with_network_cap(2, 24, 48),
        );
        let t0 = Instant::now();
        let _held: Vec<_> = (0..2)
            .map(|_| t.admit_at("2001:db8:9:1::1".parse().unwrap(), t0).unwrap())
            .collect();
        // 1,000 hosts retrying every 5 s (200 refused connects a second, four addresses'
        // connect rate) for a minute, after a burst of 1,000 at once.
        for i in 0..13_000u32 {
            let at = t0 + Duration::from_millis(5 * u64::from(i.saturating_sub(1_000)));
            let a = IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                9,
                (i % 1_000 + 2) as u16,
                0,
                0,
                0,
                1,
            ));
            assert_eq!(
                t.admit_at(a, at).unwrap_err(),
                Refusal::PerNetwork(2),
                "{i}"
            );
        }
    }

    /// The relay full (`max_connections`): 1,000 honest hosts of one /48 (each its own
    /// /64) reconnecting once a second, 1,000 refused connects a second from the network
    /// — over its 400/s — are told the relay is full every time, never churning: the
    /// relay being full is not the network's doing (it was banned as a whole). And with no
    /// network cap (0: one network really brings that many clients) a network is never
    /// charged, however many of its addresses are refused at their own cap.
    #[test]
    fn a_network_is_not_banned_for_a_full_relay_nor_without_a_network_cap() {
        let (rate, burst) = (50, 256);
        let t = Arc::new(
            AddrTable::new(
                UNLIMITED,
                (rate, burst),
                64,
                256,
                1,
                Duration::from_secs(60),
            )
            .with_network_cap(1_250, 24, 48),
        );
        let t0 = Instant::now();
        let host = |i: u32| {
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 7, i as u16, 0, 0, 0, 1,
            ))
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The relay's one place, held by another network.
        let _held = welcomed(&t, t.admit_at(ip("192.0.2.1"), t0).unwrap());
        for round in 0..3u64 {
            for i in 0..1_000u32 {
                let at =
                    t0 + Duration::from_secs(round) + Duration::from_micros(100 * u64::from(i));
                let a = host(i + 1);
                assert_eq!(
                    t.admit_at(a, at).unwrap_err(),
                    Refusal::Global(1),
                    "round {round}, {a}"
                );
                assert!(!t.banned_at(a, at), "round {round}, {a} banned");
            }
        }
        // No network cap: 3,000 /64s of one /48 each at its own cap (1), each connecting
        // again at once, are refused per address, the network never charged nor banned.
        let t = Arc::new(
            AddrTable::new(
                UNLIMITED,
                (rate, burst),
                64,
                1,
                100_000,
                Duration::from_secs(60),
            )
            .with_network_cap(0, 24, 48),
        );
        let held: Vec<_> = (0..3_000)
            .map(|i| t.admit_at(host(i + 1), t0).unwrap())
            .collect();
        for i in 0..3_000u32 {
            let at = t0 + Duration::from_micros(u64::from(i));
            assert_eq!(
                t.admit_at(host(i + 1), at).unwrap_err(),
                Refusal::PerAddr(1),
                "{i}"
            );
            assert!(!t.banned_at(host(i + 1), at), "{i} banned");
        }
        assert!(t.lock().net_refusals.is_empty());
        drop(held);
    }

    /// Many addresses holding connections: a new address sweeps the table only when it has
    /// doubled since the last sweep, not on every connect (each a scan under the lock).
    #[test]
    fn sweeps_of_the_address_table_are_amortized() {
        let t = Arc::new(AddrTable::new(
            UNLIMITED,
            (0, 0),
            64,
            4,
            1_000_000,
            Duration::ZERO,
        ));
        let now = Instant::now();
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let held: Vec<_> = (0..6000).map(|i| t.admit_at(ip(i), now).unwrap()).collect();
        let sweeps = t.lock().sweeps;
        assert_eq!(
            sweeps, 1,
            "one sweep at 4,096 entries, none after (live ones stay)"
        );
        assert_eq!(t.lock().sweep_at, 8192);
        drop(held);
    }
}
