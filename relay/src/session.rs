//! The per-connection protocol state machine: inbound events in, frames queued out.
//!
//! It does no I/O itself — it reads [`Inbound`] events, talks to the router and queues
//! replies on the connection's [`Outbound`] — so the same logic serves every transport and
//! can be driven directly by property tests. Every outcome for client bytes is either a
//! reply, a typed `Err` frame, or an orderly close; nothing here panics on input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use whispeer_protocol::frame::{
    features, msg_flags, negotiate_version, pub_flags, Ack, Auth, Challenge, Close, ErrFrame,
    Hello, Pong, Pub, PubAck, Replay, Sub, SubOk, Unsub, Welcome, PROTOCOL_VERSION,
};
use whispeer_protocol::limits::HANDSHAKE_MAX_FRAME;
use whispeer_protocol::relay_name;
use whispeer_protocol::{codec, DecodeError, ErrorCode, Frame, Qos, TokenPattern};

use crate::accounts::{owner_of_secret, Account, ClaimHold, Credential, Refusal, Right, Rights};
use crate::flow::ConnUnacked;
use crate::ids::{ConnId, SubId, TransportKind};
use crate::outbound::{Offer, Outbound, Room};
use crate::plugin::{ConnectInfo, DisconnectInfo, PublishInfo, SubscribeInfo};
use crate::rate::{AddrSlot, Kind, SharedBuckets, TokenBucket};
use crate::relay::Shared;
use crate::router::{msg_frame, SubStart, Target, Tracking, Wakes};
use crate::store::{Accepted, DurableKey, Tenant};
use crate::transport::Inbound;

/// What the driver should do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Keep reading.
    Continue,
    /// Stop reading; the outbound queue is closing (its last frame, if any, explains why).
    Close,
}

/// The relay's software name in `Welcome`.
/// The `Err` a publisher gets when the store failed its publish (counted).
fn store_failure(
    metrics: &crate::metrics::Metrics,
    e: &crate::store::StoreError,
    publish_id: [u8; 16],
) -> Frame {
    metrics.error_sent(e.code());
    Frame::Err(ErrFrame {
        code: e.code(),
        message: e.to_string(),
        fatal: false,
        sub_id: None,
        publish_id: Some(publish_id),
    })
}

/// The pause after the first refused publish in a row; it doubles per further refusal.
const REFUSAL_PAUSE: Duration = Duration::from_micros(500);
/// Doublings of [`REFUSAL_PAUSE`] at most (0.5 ms × 2^10 ≈ 0.5 s).
const MAX_REFUSAL_DOUBLINGS: u32 = 11;
const RELAY_NAME: &str = concat!("whispeer-relay/", env!("CARGO_PKG_VERSION"));

/// Maps a frame decoding failure to the error code the client is told.
pub(crate) fn classify(e: &DecodeError) -> ErrorCode {
    match e {
        DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrame,
        DecodeError::InvalidPattern(_) => ErrorCode::InvalidFilter,
        DecodeError::TooLarge { what: "filter", .. }
        | DecodeError::InvalidField {
            field: "filter" | "key_id",
            ..
        } => ErrorCode::InvalidFilter,
        DecodeError::TooLarge { what: "frame", .. } => ErrorCode::FrameTooLarge,
        DecodeError::UnsupportedSuite(_) | DecodeError::InvalidHeader(_) => {
            ErrorCode::InvalidEnvelope
        }
        DecodeError::UnsupportedVersion { what, .. }
        | DecodeError::Truncated { what, .. }
        | DecodeError::TooLarge { what, .. }
            if what.starts_with("envelope") || *what == "sealed name" =>
        {
            ErrorCode::InvalidEnvelope
        }
        _ => ErrorCode::Malformed,
    }
}

/// A durable a deferred `Sub` created, and the floor it created it at (see
/// [`Session::subscribe`]).
type Created = Option<(DurableKey, u64)>;

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    shared: Arc<Shared>,
    conn: ConnId,
    transport: TransportKind,
    peer: Option<SocketAddr>,
    out: Arc<Outbound>,
    /// `Hello` was accepted and `on_connect` ran.
    greeted: bool,
    /// How many plugins' `on_connect` accepted the connection (only they see a greeted
    /// `on_disconnect`; [`crate::plugin::Plugins::connect`]).
    plugins_accepted: usize,
    /// `Welcome` was sent: the connection may subscribe and publish.
    open: bool,
    subs: HashMap<SubId, TokenPattern>,
    /// At-least-once state of QoS ≥ 1 and durable subscriptions, with their index entry
    /// (for the catch-up after a credit pause).
    tracked: HashMap<SubId, (Arc<Tracking>, Arc<Target>)>,
    /// The subscription of each tracking in `tracked`, by [`Tracking::id`] (what the
    /// connection's index of unacknowledged deliveries names).
    track_ids: HashMap<u64, SubId>,
    /// Unacknowledged bytes of all its at-least-once subscriptions.
    unacked: Arc<ConnUnacked>,
    /// Durable names this connection holds.
    durables: HashMap<SubId, DurableKey>,
    /// Feature bits granted in `Welcome`.
    granted: u64,
    bucket: TokenBucket,
    sub_bucket: TokenBucket,
    ack_bucket: TokenBucket,
    /// This connection's place in the per-address table (none in process).
    slot: Option<AddrSlot>,
    /// Its place among the connections not yet welcomed: taken out at `Welcome`, or
    /// evicted first by a newer connection while the relay is full ([`crate::handshakes`]).
    ticket: Option<Arc<crate::handshakes::Ticket>>,
    /// Over a rate: the reader pauses until then.
    pause: Option<Instant>,
    /// Publishes refused in a row (store busy or full, quota, rights): each one pauses the
    /// reader longer, so a client that ignores refusals cannot keep the relay busy refusing.
    refused_in_a_row: u32,
    /// Publish rate tokens charged for routing walks since the reader last took them
    /// ([`Session::take_walk_tokens`]: the light runtime's hop rule counts them).
    walk_tokens: u64,
    /// Walk tokens of its publishes that the JetStream stream numbered, added when this
    /// relay routed them (after the publish was handled: `Router::owe_walk`); charged
    /// before the next frame ([`Session::on_inbound`]).
    walk_debt: crate::router::WalkDebt,
    reason: String,
    finished: bool,
    /// Whose store quota this connection's writes count against (the source address; the
    /// account once relay accounts authenticate it).
    pub(crate) tenant: Tenant,
    /// A `Hello` arrived (a second one is a violation, also while authenticating).
    hello_seen: bool,
    /// Waiting for `Auth`: the negotiated version, the client name, the nonce sent in
    /// `Challenge` and the account key it must be signed with.
    challenge: Option<PendingAuth>,
    /// The authenticated relay account as it was when the connection authenticated (its
    /// name and identity; its tenant and durable owner derive from the identity): its
    /// current rights and group are looked up at each `Pub` and `Sub` (an entry of the same
    /// name with another identity is another account: refused as removed), and when a
    /// reload of the account list takes a right away the reload tells this session, which
    /// ends the subscriptions that no longer hold ([`Session::rights_changed`]). A reload
    /// that revokes the credential (below) closes the connection.
    account: Option<Arc<Account>>,
    /// What the connection proved: the account key or the token (its hash). Recorded with
    /// the connection in the live table, so replacing the key or token while keeping the
    /// name closes it.
    credential: Option<Credential>,
    /// The reload's notice that the account lost a right or changed group, until the
    /// connection's read loop takes it (made when the authenticated connection opens).
    rights_changed_rx: Option<tokio::sync::mpsc::Receiver<()>>,
    /// The rights each subscription needed beyond `subscribe` (replay, durable); a
    /// subscription absent here needed only `subscribe`.
    sub_rights: HashMap<SubId, Rights>,
    /// Each subscription's hold on its key id's claim (while claims may lapse: see
    /// `auth.claim_idle_ms`); given back with the subscription.
    claim_holds: HashMap<SubId, ClaimHold>,
    /// The account's rate buckets, shared by its connections (see `rate::SharedBuckets`).
    account_rates: Option<SharedBuckets>,
    /// Writers to wake once this turn of frames is handled ([`Wakes`]).
    wakes: Wakes,
    /// A `Sub` or `Pub` held until the auth-state line it needs is on disk; for a durable
    /// `Sub` that created its durable before recording the owner, that durable and the
    /// floor it was created at (see [`Session::subscribe`]).
    deferred: Option<(u64, Frame, Created)>,
    /// The request being handled is a deferred one resumed ([`Session::resume_deferred`]):
    /// the plugins accepted it before it was deferred, so they do not see it twice.
    resumed: bool,
    /// Where the store reports a durable name whose cluster-wide hold was lost, with the
    /// hold's generation ([`crate::store::HoldLost`]). Made at the first durable
    /// subscription: a channel costs ~2 KiB (its first block of slots), which every idle
    /// connection would otherwise hold.
    hold_lost: Option<tokio::sync::mpsc::UnboundedSender<(DurableKey, u64)>>,
    /// Its receiving end, until the connection's read loop takes it.
    hold_lost_rx: Option<tokio::sync::mpsc::UnboundedReceiver<(DurableKey, u64)>>,
    /// The generation of the hold each durable subscription took (the last one handed out
    /// in `hold_generation`).
    hold_gens: HashMap<SubId, u64>,
    hold_generation: u64,
    /// Work done by `Ack` frames (for tests): sequences looked up in subscriptions'
    /// unacknowledged deliveries, plus subscriptions checked for a catch-up.
    #[cfg(test)]
    ack_work: u64,
}

/// Logs, at most once a minute, that a sign-in bound to a name this relay does not list
/// was refused: an operator whose clients dial the relay by a name missing from
/// `auth.names` learns it here (the name escaped; anyone can send one, hence the limit).
fn log_other_name(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now.saturating_sub(last) >= 60)
        && LAST
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::info!(name = ?name,
            "a sign-in bound to a relay name not in auth.names was refused: if clients dial \
             this relay by that name, add it (another relay passing this relay's challenge \
             on gets the same refusal)");
    }
}

#[derive(Debug)]
struct PendingAuth {
    version: u64,
    client: Option<String>,
    nonce: [u8; 32],
    account: [u8; 32],
    features: u64,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        conn: ConnId,
        transport: TransportKind,
        peer: Option<SocketAddr>,
        out: Arc<Outbound>,
        now: Instant,
        slot: Option<AddrSlot>,
    ) -> Self {
        let l = &shared.config.limits;
        let bucket = TokenBucket::new(l.publish_rate, l.publish_burst, now);
        let sub_bucket = TokenBucket::new(l.sub_rate, l.sub_burst, now);
        let ack_bucket = TokenBucket::new(l.ack_rate, l.ack_burst, now);
        let tenant = Tenant::from_peer(peer, l.addr_ipv6_prefix);
        let d = &shared.config.delivery;
        let budget = shared.router.unacked_budget(d.total_unacked_bytes);
        // The budget closes the connection as a slow consumer to take its room back when
        // the budget is spent and its address holds the most (`UnackedBudget::reclaim`).
        let evict: crate::flow::Evict = {
            let (out, metrics) = (Arc::downgrade(&out), shared.metrics.clone());
            Box::new(move || {
                let Some(out) = out.upgrade() else { return };
                if out.is_closing() {
                    return;
                }
                metrics.slow_consumer_disconnect();
                out.close_discarding(codec::encode_prefixed(&Frame::Err(ErrFrame {
                    code: ErrorCode::SlowConsumer,
                    message: "the relay's budget of unacknowledged bytes is spent and this \
                              address holds the most of it: acknowledge what you receive"
                        .into(),
                    fatal: true,
                    sub_id: None,
                    publish_id: None,
                })));
            })
        };
        let unacked = ConnUnacked::new(
            d.connection_unacked_bytes,
            Some(budget.share(tenant.clone(), evict)),
        );
        Self {
            shared,
            conn,
            transport,
            peer,
            out,
            greeted: false,
            plugins_accepted: 0,
            open: false,
            subs: HashMap::new(),
            tracked: HashMap::new(),
            track_ids: HashMap::new(),
            unacked,
            durables: HashMap::new(),
            granted: 0,
            bucket,
            sub_bucket,
            ack_bucket,
            slot,
            ticket: None,
            pause: None,
            refused_in_a_row: 0,
            walk_tokens: 0,
            walk_debt: crate::router::WalkDebt::default(),
            reason: String::from("open"),
            finished: false,
            tenant,
            hello_seen: false,
            challenge: None,
            account: None,
            credential: None,
            rights_changed_rx: None,
            sub_rights: HashMap::new(),
            claim_holds: HashMap::new(),
            account_rates: None,
            wakes: Wakes::new(),
            deferred: None,
            resumed: false,
            hold_lost: None,
            hold_lost_rx: None,
            hold_gens: HashMap::new(),
            hold_generation: 0,
            #[cfg(test)]
            ack_work: 0,
        }
    }

    /// The receiver of lost durable holds (see [`Session::hold_lost`]): `Some` once, after
    /// the first durable subscription made the channel.
    pub(crate) fn take_hold_lost(
        &mut self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<(DurableKey, u64)>> {
        self.hold_lost_rx.take()
    }

    /// The cluster-wide hold on durable `key` was lost (not renewed in time, or taken at
    /// another relay): the subscription holding it here ends, with a non-fatal
    /// `Err(not_allowed)` naming it, so two relays never both deliver it for long.
    pub(crate) fn hold_lost(&mut self, key: DurableKey, generation: u64) -> Flow {
        // Only the subscription that took this very hold: a notice about a hold given back
        // since (unsubscribed, then subscribed again) must not end the new one.
        let Some(sub_id) = self
            .durables
            .iter()
            .find(|(id, k)| **k == key && self.hold_gens.get(id) == Some(&generation))
            .map(|(id, _)| *id)
        else {
            return Flow::Continue;
        };
        tracing::warn!(
            conn = %self.conn,
            durable = ?key.name,
            "durable subscription ended: its cluster hold lapsed"
        );
        self.drop_sub(sub_id);
        // Retryable (`busy`): the name is free again once the new holder lets it go.
        self.reply_err(
            ErrorCode::Busy,
            format!(
                "durable subscription {:?} ended: this relay could not keep its hold in the \
                 cluster (it may be held at another relay now); subscribe again",
                key.name
            ),
            Some(sub_id),
            None,
        )
    }

    /// The receiver of the reload's notices that the account lost a right or changed group
    /// (see [`Session::rights_changed`]): `Some` once, after an authenticated `Welcome`.
    pub(crate) fn take_rights_changed(&mut self) -> Option<tokio::sync::mpsc::Receiver<()>> {
        self.rights_changed_rx.take()
    }

    /// A reload of the account list took a right away from this connection's account or
    /// moved it to another group: every subscription that a `Sub` could not make now
    /// (its rights: `subscribe`, plus `replay`/`durable` if it asked for them; its key id
    /// claimed by the account's group) ends — out of the index, its at-least-once state and
    /// durable name given back — with the non-fatal `Err(auth_failed)` naming its `sub_id`
    /// that such a `Sub` would get. Publishes need no pass: each is authorized as it
    /// arrives. Runs once per such reload, over this connection's subscriptions only; no
    /// delivery ever looks at the account.
    pub(crate) fn rights_changed(&mut self) -> Flow {
        let Some(who) = self.account.clone() else {
            return Flow::Continue;
        };
        let accounts = self.shared.accounts.clone();
        let subscribe = Rights::of(&[Right::Subscribe]);
        let mut ended: Vec<(SubId, Refusal)> = self
            .subs
            .iter()
            .filter_map(|(id, p)| {
                let need = self.sub_rights.get(id).copied().unwrap_or(subscribe);
                let r = accounts.still_allowed(&who, p.key_id(), need).err()?;
                Some((*id, r))
            })
            .collect();
        ended.sort_unstable_by_key(|(id, _)| id.0);
        for (sub_id, r) in ended {
            if r.fatal {
                return self.fatal(r.code, r.message, None, None);
            }
            tracing::info!(conn = %self.conn, account = %who.name, sub_id = sub_id.0,
                reason = %r.message, "subscription ended: the account list changed");
            self.drop_sub(sub_id);
            let message = format!("subscription ended: {}", r.message);
            if self.reply_err(r.code, message, Some(sub_id), None) == Flow::Close {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// Whether `Welcome` was sent.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// Publish rate tokens charged for routing walks since the last call (see
    /// [`crate::rate::walk_tokens`]).
    pub(crate) fn take_walk_tokens(&mut self) -> u64 {
        std::mem::take(&mut self.walk_tokens)
    }

    /// Charges `extra` walk tokens ([`crate::rate::walk_tokens`]) to the connection's,
    /// the address's and the account's publish buckets, and counts them for the reader's
    /// turn and the light runtime's hop rule ([`take_walk_tokens`](Self::take_walk_tokens)).
    fn charge_walk(&mut self, extra: u64, now: Instant) {
        if extra > 0 {
            let wait = self.bucket.take(extra as f64, now);
            self.charge(wait, now);
            self.charge_shared(Kind::Publish, extra as f64, now);
            self.walk_tokens += extra;
            self.shared.metrics.walk_charged(extra);
        }
    }

    /// Over a rate limit: the instant until which the reader must pause (taken once).
    pub(crate) fn take_pause(&mut self) -> Option<Instant> {
        self.pause.take()
    }

    fn charge(&mut self, wait: Option<Duration>, now: Instant) {
        if let Some(w) = wait {
            let until = now + w;
            self.pause = Some(self.pause.map_or(until, |p| p.max(until)));
        }
    }

    /// Subscriptions held.
    #[cfg(test)]
    pub(crate) fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Deliveries not yet acknowledged, summed over the at-least-once subscriptions.
    #[cfg(test)]
    pub(crate) fn unacked_deliveries(&self) -> usize {
        self.tracked.values().map(|(t, _)| t.pending()).sum()
    }

    /// Handles one transport event.
    pub(crate) fn on_inbound(&mut self, ev: Inbound, now: Instant) -> Flow {
        if self.out.is_closing() {
            return Flow::Close;
        }
        // Walks of publishes the stream numbered since (JetStream store): charged late, but
        // before this connection is served more.
        if self.walk_debt.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            let owed = self.walk_debt.swap(0, std::sync::atomic::Ordering::Relaxed);
            self.charge_walk(owed, now);
        }
        match ev {
            Inbound::Frame(bytes) => {
                self.shared.metrics.frame_in(bytes.len());
                self.on_frame(&bytes, now)
            }
            Inbound::Alive => Flow::Continue,
            Inbound::Text => self.fatal(
                ErrorCode::ProtocolViolation,
                "text messages are not allowed: send frames as binary messages".into(),
                None,
                None,
            ),
            Inbound::TooLarge { len } => {
                let max = self.shared.config.limits.max_frame;
                let why = if self.open || max <= HANDSHAKE_MAX_FRAME {
                    format!("frame of {len} bytes exceeds max_frame {max}")
                } else {
                    format!(
                        "frame of {len} bytes before the handshake completed: until Welcome \
                         frames are limited to {HANDSHAKE_MAX_FRAME} bytes"
                    )
                };
                self.fatal(ErrorCode::FrameTooLarge, why, None, None)
            }
            Inbound::Invalid(why) => self.fatal(ErrorCode::Malformed, why, None, None),
            Inbound::Closed => {
                self.close_quietly("peer closed the connection");
                Flow::Close
            }
        }
    }

    fn on_frame(&mut self, bytes: &Bytes, now: Instant) -> Flow {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => return self.fatal(classify(&e), e.to_string(), None, None),
        };
        if !self.open {
            return match frame {
                Frame::Hello(_) if self.hello_seen => self.fatal(
                    ErrorCode::ProtocolViolation,
                    "a second Hello".into(),
                    None,
                    None,
                ),
                Frame::Hello(h) => self.on_hello(h),
                Frame::Auth(a) if self.challenge.is_some() => self.on_auth(a),
                other => self.fatal(
                    ErrorCode::ProtocolViolation,
                    format!("{} before Hello", other.name()),
                    None,
                    None,
                ),
            };
        }
        match frame {
            Frame::Sub(s) => {
                let cost = if s.replay.is_some() || s.durable.is_some() {
                    self.shared.config.limits.replay_cost.max(1) as f64
                } else {
                    1.0
                };
                self.charge_sub(cost, now);
                self.on_sub(s)
            }
            Frame::Unsub(u) => {
                self.charge_sub(1.0, now);
                self.on_unsub(u)
            }
            Frame::Pub(p) => {
                // Over the publish rate (per connection, address or account): accepted,
                // and the reader pauses until the buckets refill, which slows the
                // publisher down.
                let wait = self.bucket.take(1.0, now);
                self.charge(wait, now);
                self.charge_shared(Kind::Publish, 1.0, now);
                self.on_pub(p, now)
            }
            // Every frame is charged to a bucket: Ping, Pong and a client's non-fatal Err
            // to the ack buckets (connection, address, account), which pause the reader
            // rather than refuse. Uncharged, a Ping flood from an address's connections
            // cost the relay a Pong each, past every per-address rate.
            Frame::Ping(p) => {
                self.charge_ack(now);
                self.send(&Frame::Pong(Pong { nonce: p.nonce }))
            }
            // Liveness only; the idle timer was reset by the driver.
            Frame::Pong(_) => {
                self.charge_ack(now);
                Flow::Continue
            }
            Frame::Ack(a) => {
                self.charge_ack(now);
                self.on_ack(a)
            }
            Frame::Close(c) => {
                self.close_quietly(&format!("client closed: {}", c.code.name()));
                Flow::Close
            }
            Frame::Err(e) => {
                tracing::debug!(conn = %self.conn, code = e.code.name(), fatal = e.fatal,
                    "client reported an error");
                self.charge_ack(now);
                if e.fatal {
                    self.close_quietly(&format!("client error: {}", e.code.name()));
                    Flow::Close
                } else {
                    Flow::Continue
                }
            }
            Frame::Hello(_) => self.fatal(
                ErrorCode::ProtocolViolation,
                "a second Hello".into(),
                None,
                None,
            ),
            other => self.fatal(
                ErrorCode::ProtocolViolation,
                format!("{} is a relay-to-client frame", other.name()),
                None,
                None,
            ),
        }
    }

    /// Refuses a publish with a non-fatal `Err` naming it, and pays the refusal pause
    /// ([`Session::refused_publish`]): every refused publish goes through here or through
    /// that pause, so no refusal is free for a client that keeps firing.
    fn refuse_publish(
        &mut self,
        now: Instant,
        code: ErrorCode,
        message: String,
        publish_id: Option<[u8; 16]>,
    ) -> Flow {
        self.refused_publish(now);
        self.reply_err(code, message, None, publish_id)
    }

    /// A publish was refused: pause reading for 0.5 ms doubling per refusal in a row, up to
    /// about 0.5 s; the next accepted publish resets it. A client that waits before it
    /// retries a refused publish hardly notices; one that keeps firing is
    /// slowed to a few refusals per second instead of costing the relay a refusal per frame.
    fn refused_publish(&mut self, now: Instant) {
        self.refused_in_a_row = (self.refused_in_a_row + 1).min(MAX_REFUSAL_DOUBLINGS);
        let wait = REFUSAL_PAUSE * (1u32 << (self.refused_in_a_row - 1));
        self.shared.metrics.refusal_paused();
        self.charge(Some(wait), now);
    }

    /// Charges one frame to the ack buckets (`Ack`, and the frames that cost the relay
    /// little but must not be free: `Ping`, `Pong`, a client's `Err`).
    fn charge_ack(&mut self, now: Instant) {
        let wait = self.ack_bucket.take(1.0, now);
        self.charge(wait, now);
        self.charge_shared(Kind::Ack, 1.0, now);
    }

    fn charge_sub(&mut self, cost: f64, now: Instant) {
        let wait = self.sub_bucket.take(cost, now);
        self.charge(wait, now);
        self.charge_shared(Kind::Sub, cost, now);
    }

    /// Charges the buckets shared with other connections: the source address's and, once
    /// authenticated, the account's.
    fn charge_shared(&mut self, kind: Kind, n: f64, now: Instant) {
        let wait = self.slot.as_ref().and_then(|s| s.take(kind, n, now));
        self.charge(wait, now);
        if let Some(a) = &self.account_rates {
            let wait = a.take(kind, n, now);
            self.charge(wait, now);
        }
    }

    /// The connection is `acct`'s, proved by `credential`: its rights and its rate buckets.
    /// The buckets are the account identity's ([`Account::owner`]), not its name's: a name
    /// removed and added again (a new id) is another account and starts with full buckets.
    fn set_account(&mut self, acct: Arc<Account>, credential: Credential) {
        self.account_rates = Some(self.shared.account_rates.buckets(&acct.owner()));
        self.account = Some(acct);
        self.credential = Some(credential);
    }

    fn on_hello(&mut self, h: Hello) -> Flow {
        let Some(version) = negotiate_version(&h.versions) else {
            return self.fatal(
                ErrorCode::UnsupportedVersion,
                format!(
                    "no common protocol version: the relay speaks {PROTOCOL_VERSION}, the client offered {:?}",
                    h.versions
                ),
                None,
                None,
            );
        };
        self.hello_seen = true;
        if self.shared.accounts.required() {
            if let Some(account) = h.account {
                let mut nonce = [0u8; 32];
                if getrandom::getrandom(&mut nonce).is_err() {
                    return self.fatal(
                        ErrorCode::Internal,
                        "no randomness for a challenge".into(),
                        None,
                        None,
                    );
                }
                // Every account key gets a challenge, listed or not, so the answer does not
                // tell which keys are accounts.
                self.challenge = Some(PendingAuth {
                    version,
                    client: h.client,
                    nonce,
                    account,
                    features: h.features,
                });
                // With names of its own the relay takes only sign-ins bound to one of them
                // (PROTOCOL §3.5.6), and says so.
                let bound = (!self.shared.auth_names.is_empty()).then_some(true);
                return self.send(&Frame::Challenge(Challenge { nonce, bound }));
            }
            let Some(token) = &h.auth else {
                self.shared.metrics.connection_rejected();
                return self.fatal(
                    ErrorCode::AuthRequired,
                    "this relay requires a relay account: send Hello.account (Ed25519 key, \
                     then answer the Challenge) or Hello.auth (bearer token)"
                        .into(),
                    None,
                    None,
                );
            };
            match self.shared.accounts.by_token(token) {
                Some(a) => self.set_account(a, Credential::token(token)),
                None => {
                    self.shared.metrics.connection_rejected();
                    return self.fatal(
                        ErrorCode::AuthFailed,
                        "unknown or revoked bearer token".into(),
                        None,
                        None,
                    );
                }
            }
        }
        self.welcome(version, h.client.as_deref(), h.auth.is_some(), h.features)
    }

    fn on_auth(&mut self, a: Auth) -> Flow {
        let Some(p) = self.challenge.take() else {
            return Flow::Close;
        };
        // Bound to this relay, before the signature is looked at: the same for every key,
        // so the answer tells nothing about which keys are accounts.
        if let Err(refused) = relay_name::check(&self.shared.auth_names, a.relay.as_deref()) {
            self.shared.metrics.connection_rejected();
            let message = match &a.relay {
                // Client-chosen text: escaped ({:?}) wherever it is shown or logged.
                Some(name) => {
                    log_other_name(name);
                    format!(
                        "authentication failed: {refused}: {name:?} (the client dialed this \
                         relay by a name missing from its auth.names, or another relay \
                         passed this relay's challenge on)"
                    )
                }
                None => format!(
                    "authentication failed: {refused} (a client from before relay binding — \
                     update it — or another relay passing this relay's challenge on)"
                ),
            };
            return self.fatal(ErrorCode::AuthFailed, message, None, None);
        }
        let signed = a.sig_input(&p.nonce, &p.account);
        match self.shared.accounts.verify(&p.account, &signed, &a.sig) {
            Some(acct) => {
                self.set_account(acct, Credential::Key(p.account));
                self.welcome(p.version, p.client.as_deref(), true, p.features)
            }
            None => {
                self.shared.metrics.connection_rejected();
                self.fatal(
                    ErrorCode::AuthFailed,
                    "authentication failed: unknown account or bad signature".into(),
                    None,
                    None,
                )
            }
        }
    }

    fn welcome(&mut self, version: u64, client: Option<&str>, has_auth: bool, wanted: u64) -> Flow {
        self.greeted = true;
        if let Some(acct) = &self.account {
            // Quotas follow the account's identity, not the address it connects from (nor
            // its name: a name added again is a new tenant).
            self.tenant = acct.tenant();
        }
        let info = ConnectInfo {
            conn: self.conn,
            transport: self.transport,
            peer: self.peer,
            version,
            client,
            has_auth,
            authenticated: self.account.is_some(),
        };
        // Counted in place, plugin by plugin: if one panics, the drop's `finish` still
        // gives the plugins before it their greeted disconnect.
        if let Err((plugin, why)) = self
            .shared
            .plugins
            .connect(&info, &mut self.plugins_accepted)
        {
            self.shared.metrics.rejected_by_plugin();
            self.shared.metrics.connection_rejected();
            return self.fatal(
                ErrorCode::NotAllowed,
                format!("refused by {plugin}: {}", why.0),
                None,
                None,
            );
        }
        let mut session = [0u8; 16];
        if getrandom::getrandom(&mut session).is_err() {
            return self.fatal(
                ErrorCode::Internal,
                "no randomness for a session id".into(),
                None,
                None,
            );
        }
        if let (Some(acct), Some(credential)) = (&self.account, self.credential) {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            if !self
                .shared
                .accounts
                .attach(self.conn, acct, credential, &self.out, tx)
            {
                // Revoked by a reload between the check and now.
                self.shared.metrics.connection_rejected();
                return self.fatal(
                    ErrorCode::AuthFailed,
                    "the account was removed or its key or token replaced".into(),
                    None,
                    None,
                );
            }
            self.rights_changed_rx = Some(rx);
        }
        // From here on never evicted; or evicted just before: closed, not welcomed. Taken
        // last, after the plugins and the account: a connection they refuse stays
        // evictable while it closes.
        if let Some(t) = &self.ticket {
            if !self.shared.handshakes.pass(t) {
                return self.evicted();
            }
        }
        self.open = true;
        let mut offered = self.shared.router.store().features();
        if offered & features::AT_LEAST_ONCE != 0 {
            offered |= features::FLOW_CONTROL;
        }
        offered |= features::HISTORY_END | features::NAMED_COPIES;
        if offered & (features::RETAIN | features::REPLAY) == features::RETAIN | features::REPLAY {
            offered |= features::RETAINED_BEFORE;
        }
        self.granted = wanted & offered;
        let cfg = &self.shared.config;
        let welcome = Frame::Welcome(Welcome {
            version,
            features: self.granted,
            max_frame: cfg.limits.max_frame as u64,
            session,
            relay: Some(RELAY_NAME.into()),
            heartbeat_ms: cfg.timeouts.heartbeat_ms,
            seq_space: Some(self.shared.router.store().seq_space()),
        });
        self.send(&welcome)
    }

    fn on_sub(&mut self, s: Sub) -> Flow {
        self.subscribe(s, None)
    }

    /// Handles a `Sub`. `created`: the durable this `Sub` created before it waited for its
    /// owner's auth-state line, and the floor it was created at (still there, it is handled
    /// as new again, not resumed from its floor).
    fn subscribe(&mut self, s: Sub, created: Created) -> Flow {
        let resumed = std::mem::take(&mut self.resumed);
        let sub_id = SubId(s.sub_id);
        let limits = &self.shared.config.limits;
        let depth = s.pattern.elems().len();
        if depth > limits.max_filter_depth {
            return self.fatal(
                ErrorCode::InvalidFilter,
                format!(
                    "filter has {depth} levels; the limit is {}",
                    limits.max_filter_depth
                ),
                Some(sub_id),
                None,
            );
        }
        let replacing = self.subs.contains_key(&sub_id);
        if !replacing && self.subs.len() >= limits.max_subscriptions {
            return self.fatal(
                ErrorCode::TooManySubscriptions,
                format!(
                    "subscription limit of {} per connection reached",
                    limits.max_subscriptions
                ),
                Some(sub_id),
                None,
            );
        }
        let replaced = self.subs.get(&sub_id).map(|p| p.elems().len());
        // Checked and counted at once, given back on every return below that makes no
        // subscription (see `SubQuota::reserve`).
        let shared = self.shared.clone();
        let reservation = match shared.sub_quota.reserve(&self.tenant, depth, replaced) {
            Ok(r) => r,
            Err(why) => {
                return self.reply_err(ErrorCode::TooManySubscriptions, why, Some(sub_id), None)
            }
        };
        let mut need = Rights::of(&[Right::Subscribe]);
        if s.replay.is_some() {
            need = need.with(Right::Replay);
        }
        if s.durable.is_some() {
            need = need.with(Right::Durable);
        }
        // Rights first, without claiming the key id; the claim (`authorize`) only once the
        // plugins and the store accepted the request: claimed first, a `Sub` they refused
        // kept the key id for the account's group for good.
        if let Err(r) = self.may(s.pattern.key_id(), need) {
            return self.refuse(r, Some(sub_id), None);
        }
        let info = SubscribeInfo {
            conn: self.conn,
            sub_id,
            pattern: &s.pattern,
            qos: s.qos,
        };
        if !resumed {
            if let Err((plugin, why)) = self.shared.plugins.subscribe(&info) {
                self.shared.metrics.rejected_by_plugin();
                return self.reply_err(
                    ErrorCode::NotAllowed,
                    format!("refused by {plugin}: {}", why.0),
                    Some(sub_id),
                    None,
                );
            }
        }
        let store = self.shared.router.store().clone();
        let supported = store.features();
        if (s.qos != Qos::AtMostOnce || s.durable.is_some() || s.replay.is_some())
            && supported & features::AT_LEAST_ONCE == 0
        {
            return self.reply_err(
                ErrorCode::NotAllowed,
                format!(
                    "this relay has no store (store kind {}): QoS >= 1, replay and durable \
                     subscriptions are unavailable",
                    store.kind()
                ),
                Some(sub_id),
                None,
            );
        }
        // The hold keeps the claim from lapsing while the subscription lasts (dropped on
        // any return below that makes none).
        let hold = match self.authorize(s.pattern.key_id(), need, true) {
            Err(r) => return self.refuse(r, Some(sub_id), None),
            Ok(g) => match g.pending {
                Some(line) => return self.defer(line, Frame::Sub(s), created),
                None => g.hold,
            },
        };
        self.drop_sub(sub_id);
        let durable = s.durable.clone().map(|name| DurableKey {
            key_id: *s.pattern.key_id(),
            name,
        });
        let mut replay = s.replay;
        let mut floor = 0;
        let mut new_durable = false;
        let mut hold_gen = 0;
        if let Some(k) = &durable {
            // The owner: the authenticated account's identity, else the hash of the
            // Sub.owner secret.
            let owner = self
                .account
                .as_ref()
                .map(|a| a.owner())
                .or_else(|| s.owner.as_ref().map(owner_of_secret));
            // A store shared by relays (JetStream) keeps the owner with the durable, so a
            // relay that did not create it enforces it; otherwise the auth-state file does.
            let shared_owner = match store.durable_owner(k, owner.as_deref()) {
                Ok(b) => b,
                Err(e) => return self.reply_err(e.code(), e.to_string(), Some(sub_id), None),
            };
            // Otherwise the relay's auth-state file does: checked here, but recorded only
            // once the durable exists (below). Recorded first, a Sub refused for the quota
            // (or busy, or a store error) left an owner in memory and a line in the file
            // for good: a stranger grew both by ~1 KB per refused Sub.
            if !shared_owner {
                match self
                    .shared
                    .accounts
                    .check_durable_owner(&k.key_id, &k.name, owner.as_deref())
                {
                    Err(r) => return self.refuse(r, Some(sub_id), None),
                    Ok(Some(line)) => return self.defer(line, Frame::Sub(s), created),
                    Ok(None) => {}
                }
            }
            if !self.shared.claim_durable(k) {
                // Retryable: the name is given back when that connection ends. (A shared
                // store that noted this `Sub` as on its way to create the name lets it go.)
                store.durable_abandoned(k, owner.as_deref());
                return self.reply_err(
                    ErrorCode::Busy,
                    format!(
                        "durable subscription {:?} is active on another connection",
                        k.name
                    ),
                    Some(sub_id),
                    None,
                );
            }
            // Across relays sharing the store (JetStream): the cluster-wide hold.
            self.hold_generation += 1;
            hold_gen = self.hold_generation;
            let tx = self.hold_lost.get_or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                self.hold_lost_rx = Some(rx);
                tx
            });
            let lost = crate::store::HoldLost::new(tx.clone(), hold_gen);
            if let Err(e) = store.hold_durable(k, &lost) {
                self.shared.release_durable(k);
                store.durable_abandoned(k, owner.as_deref());
                return self.reply_err(e.code(), e.to_string(), Some(sub_id), None);
            }
            // Read under the hold and checked against this `Sub`'s owner again: the durable
            // its owner check found (or found new) may have been deleted and created again
            // by another owner since, at any relay (refused: `not_allowed`). A new one is
            // created (`set_durable`, below) with this `Sub`'s owner.
            let found = match store.durable_for(k, owner.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    self.shared.release_durable(k);
                    return self.reply_err(e.code(), e.to_string(), Some(sub_id), None);
                }
            };
            // A new durable is recorded where it starts before its Sub is answered: without
            // a replay, at the relay's last sequence. (It was recorded at 0 and moved to the
            // subscription's boundary only once the Sub succeeded: a Sub whose `SubOk` could
            // not be queued, or a race with a second connection, left it at 0, and resuming
            // it replayed the key id's whole history — to an account without the replay
            // right too.)
            let new_floor = match replay {
                Some(Replay::FromSeq(from)) => from.saturating_sub(1),
                Some(_) => 0,
                None => self.shared.router.last_seq().0,
            };
            match found {
                // Created by this very Sub, which then waited for its owner line: still new
                // (unless it moved meanwhile).
                Some(f) if created.as_ref().is_some_and(|(ck, cf)| ck == k && *cf == f) => {
                    new_durable = true;
                    floor = f;
                }
                Some(f) => {
                    floor = f;
                    replay = Some(Replay::FromSeq(f + 1));
                }
                None => {
                    new_durable = true;
                    floor = new_floor;
                    // Creating the name counts against this tenant's durable quota.
                    if let Err(e) = store.set_durable(k, floor, &self.tenant) {
                        self.shared.release_durable(k);
                        return self.reply_err(e.code(), e.to_string(), Some(sub_id), None);
                    }
                }
            }
            // The durable exists: its owner is recorded on first use, and the Sub answered
            // once that line is on disk. Meanwhile the name is given back (the reader waits;
            // the Sub is handled again then).
            if !shared_owner {
                match self
                    .shared
                    .accounts
                    .durable_owner(&k.key_id, &k.name, owner)
                {
                    Err(r) => {
                        self.shared.release_durable(k);
                        return self.refuse(r, Some(sub_id), None);
                    }
                    Ok(Some(line)) => {
                        self.shared.release_durable(k);
                        let created = new_durable.then(|| (k.clone(), floor));
                        return self.defer(line, Frame::Sub(s), created);
                    }
                    Ok(None) => {}
                }
            }
        }
        let dcfg = &self.shared.config.delivery;
        // Flow control: the Sub's credit (absent or 0: the default), capped by max_unacked.
        let credit = match s.credit {
            Some(c) if c > 0 => usize::try_from(c)
                .unwrap_or(usize::MAX)
                .min(dcfg.max_unacked),
            _ => dcfg.max_unacked,
        };
        let track = (s.qos != Qos::AtMostOnce || durable.is_some()).then(|| {
            Tracking::new(
                floor,
                replay.is_some(),
                durable.clone(),
                dcfg.ack_timeout(),
                credit,
                dcfg.max_unacked_bytes,
                self.unacked.clone(),
            )
        });
        let want_retained = s.retained && replay.is_none() && supported & features::RETAIN != 0;
        // Retained values next to the client's own replay from a sequence (granted
        // `RETAINED_BEFORE`, PROTOCOL §3.5.5): those older than it come first. Not for a
        // durable (its resume is the relay's replay, not the client's).
        let retained_before = match s.replay {
            Some(Replay::FromSeq(x))
                if s.retained
                    && durable.is_none()
                    && supported & features::RETAIN != 0
                    && self.granted & features::RETAINED_BEFORE != 0 =>
            {
                Some(x)
            }
            _ => None,
        };
        let start = SubStart {
            named: self.granted & features::NAMED_COPIES != 0,
            track: track.clone(),
            replay: replay.is_some(),
            retained: want_retained,
            gate_limit: self
                .shared
                .config
                .queue
                .capacity
                .saturating_mul(16)
                .max(1024),
        };
        // A client granted `HISTORY_END` learns from `SubOk` that `ReplayDone` ends this
        // subscription's history (replay or retained values): it holds back the live
        // messages it gets for it meanwhile (for another subscription of the connection),
        // since the relay holds back its own copies and sends them after `ReplayDone`.
        let history_end = self.granted & features::HISTORY_END != 0;
        let history = (history_end && (replay.is_some() || want_retained)).then_some(true);
        let (offer, target, boundary) =
            self.shared
                .router
                .subscribe(&s.pattern, self.conn, sub_id, &self.out, start, |seq| {
                    codec::encode_prefixed(&Frame::SubOk(SubOk {
                        sub_id: sub_id.0,
                        seq: seq.0,
                        history,
                    }))
                });
        match offer {
            Offer::Queued | Offer::DroppedOldest(_) => {}
            other => {
                if let Some(k) = &durable {
                    self.shared.release_durable(k);
                }
                return self.on_offer_failed(other);
            }
        }
        tracing::debug!(conn = %self.conn, sub_id = sub_id.0, ?replay, qos = ?s.qos,
            boundary = boundary.0, "subscribed");
        self.subs.insert(sub_id, s.pattern.clone());
        if need != Rights::of(&[Right::Subscribe]) {
            self.sub_rights.insert(sub_id, need);
        }
        if let Some(h) = hold {
            self.claim_holds.insert(sub_id, h);
        }
        reservation.keep();
        if let Some(t) = track {
            if let Some(k) = durable {
                if new_durable {
                    if let Err(e) = store.set_durable(&k, t.floor(), &self.tenant) {
                        tracing::debug!(error = %e, "durable position not recorded");
                    }
                }
                self.durables.insert(sub_id, k);
                self.hold_gens.insert(sub_id, hold_gen);
            }
            self.track_ids.insert(t.id, sub_id);
            self.tracked.insert(sub_id, (t, target.clone()));
        }
        if let Some(replay) = replay {
            let done = self.granted & (features::REPLAY | features::HISTORY_END) != 0;
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(crate::replay::history(
                        self.shared.clone(),
                        self.tenant.clone(),
                        target,
                        s.pattern,
                        crate::replay::Asked {
                            replay,
                            retained_before,
                        },
                        boundary,
                        done,
                    ));
                }
                Err(_) => {
                    return self.reply_err(
                        ErrorCode::Internal,
                        "replay needs the relay's async runtime".into(),
                        Some(sub_id),
                        None,
                    )
                }
            }
        } else if want_retained {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(crate::replay::retained(
                        self.shared.clone(),
                        self.tenant.clone(),
                        target,
                        s.pattern,
                        boundary,
                        history_end,
                    ));
                }
                Err(_) => {
                    return self.reply_err(
                        ErrorCode::Internal,
                        "retained values need the relay's async runtime".into(),
                        Some(sub_id),
                        None,
                    )
                }
            }
        }
        Flow::Continue
    }

    /// Forgets a subscription (replaced or unsubscribed): index entry, tracking, durable name.
    fn drop_sub(&mut self, sub_id: SubId) -> bool {
        let Some(old) = self.subs.remove(&sub_id) else {
            return false;
        };
        self.shared
            .sub_quota
            .remove(&self.tenant, [old.elems().len()]);
        self.shared.router.unsubscribe(&old, self.conn, sub_id);
        self.sub_rights.remove(&sub_id);
        self.claim_holds.remove(&sub_id);
        if let Some((t, _)) = self.tracked.remove(&sub_id) {
            self.track_ids.remove(&t.id);
            t.end();
        }
        self.hold_gens.remove(&sub_id);
        if let Some(k) = self.durables.remove(&sub_id) {
            self.shared.release_durable(&k);
        }
        true
    }

    /// Applies an `Ack` to the subscriptions holding its sequences, and only to them (the
    /// connection's index of unacknowledged deliveries says which): its cost is a look-up
    /// per distinct sequence plus the deliveries it frees, each of which a delivery paid
    /// for. Applied to every subscription, `Ack{seqs: [1; 4096]}` over 1000 of them cost
    /// 4 million map look-ups per 4 KiB frame, for one token of the ack rate.
    fn on_ack(&mut self, a: Ack) -> Flow {
        let held = self.unacked.holders(&a.seqs);
        if held.is_empty() {
            return Flow::Continue;
        }
        let store = self.shared.router.store();
        let mut freed = false;
        for group in held.chunk_by(|x, y| x.0 == y.0) {
            let Some((sub_id, (t, target))) = self
                .track_ids
                .get(&group[0].0)
                .and_then(|id| Some((*id, self.tracked.get(id)?)))
            else {
                continue;
            };
            let seqs: Vec<u64> = group.iter().map(|(_, seq)| *seq).collect();
            #[cfg(test)]
            {
                self.ack_work += seqs.len() as u64;
            }
            let outcome = t.ack(&seqs);
            freed |= outcome.freed;
            if let Some(floor) = outcome.floor {
                if let Some(k) = &t.durable {
                    if let Err(e) = store.set_durable(k, floor, &self.tenant) {
                        tracing::debug!(error = %e, "durable position not recorded");
                    }
                }
            }
            if outcome.catch_up {
                self.start_catch_up(sub_id, t, target);
            }
        }
        // Freed bytes count for the connection's other subscriptions too: one that paused
        // with credit of its own catches up now, not at the next tick. Only those that
        // paused since the last such ack are looked at (a claim that fails leaves nothing
        // to do: the pause's catch-up runs, or the subscription's own ack starts it).
        if freed && self.tracked.len() > 1 {
            for id in self.unacked.take_paused() {
                let Some((sub_id, (t, target))) = self
                    .track_ids
                    .get(&id)
                    .and_then(|id| Some((*id, self.tracked.get(id)?)))
                else {
                    continue;
                };
                #[cfg(test)]
                {
                    self.ack_work += 1;
                }
                if t.claim_catch_up() {
                    self.start_catch_up(sub_id, t, target);
                }
            }
        }
        Flow::Continue
    }

    /// Runs the catch-up of a paused subscription (its catching-up mark is set).
    fn start_catch_up(&self, sub_id: SubId, t: &Tracking, target: &Arc<Target>) {
        let Some(pattern) = self.subs.get(&sub_id).cloned() else {
            t.stop_catching_up();
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(crate::flow::catch_up(
                    self.shared.clone(),
                    self.tenant.clone(),
                    target.clone(),
                    pattern,
                ));
            }
            Err(_) => t.stop_catching_up(),
        }
    }

    /// Whether the connection has at-least-once subscriptions (and needs [`Session::tick`]).
    pub(crate) fn tracks(&self) -> bool {
        !self.tracked.is_empty()
    }

    /// Redelivers unacknowledged messages past the ack timeout.
    pub(crate) fn tick(&mut self, now: Instant) -> Flow {
        let mut resend = Vec::new();
        for (sub_id, (t, target)) in &self.tracked {
            if t.pending() > 0 {
                resend.extend(t.due(now, 4096));
            }
            // Paused by the relay-wide budget or a full queue with credit to spare: no ack
            // will start the catch-up, so the tick does (it waits for room before sending).
            if t.claim_catch_up() {
                self.start_catch_up(*sub_id, t, target);
            }
        }
        if resend.is_empty() {
            return Flow::Continue;
        }
        resend.sort_unstable_by_key(|(seq, _)| *seq);
        resend.dedup_by_key(|(seq, _)| *seq);
        let total = resend.len() as u64;
        let mut sent = 0;
        for (seq, env) in resend {
            let frame = msg_frame(seq, &env, msg_flags::REDELIVERED);
            // No copy into a queue without room for QoS >= 1 messages (the client does not
            // read what is queued, perhaps the first copies of these): this one and the
            // later ones (in sequence order, not encoded) are tried again after another ack
            // timeout. A redelivery is never dropped once queued, so without this a
            // non-reading client's queue grew by all of its unacknowledged bytes at every
            // timeout.
            if self.out.room_for(frame.len()) != Room::Yes {
                break;
            }
            self.out.offer_msg(&frame, false);
            sent += 1;
        }
        self.shared.metrics.redelivered(sent);
        self.shared.metrics.redeliveries_deferred(total - sent);
        if self.out.is_closing() {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn on_unsub(&mut self, u: Unsub) -> Flow {
        let sub_id = SubId(u.sub_id);
        if u.delete == Some(true) && self.subs.contains_key(&sub_id) {
            return self.delete_durable(sub_id);
        }
        match self.drop_sub(sub_id) {
            true => Flow::Continue,
            false => self.reply_err(
                ErrorCode::UnknownSubscription,
                format!("no subscription {}", u.sub_id),
                Some(sub_id),
                None,
            ),
        }
    }

    /// `Unsub {delete: true}` of a subscription this connection has: ends it and, when it
    /// is durable, deletes the durable — name, floor, owner — while still holding its name
    /// (no other `Sub` can take it in between). Not durable: ended, and a non-fatal
    /// `Err(not_allowed)` says nothing was deleted; a store error is sent the same way
    /// (the subscription is ended either way: the client asked to end it).
    fn delete_durable(&mut self, sub_id: SubId) -> Flow {
        let Some(k) = self.durables.get(&sub_id).cloned() else {
            self.drop_sub(sub_id);
            return self.reply_err(
                ErrorCode::NotAllowed,
                format!(
                    "subscription {} is not durable: there is no durable to delete",
                    sub_id.0
                ),
                Some(sub_id),
                None,
            );
        };
        let store = self.shared.router.store().clone();
        // The owner goes once the deletion is committed: the store announces it
        // (`Store::take_gone`), and the relay forgets the owner if the name is still free
        // (review F7: forgotten here at once, a failed commit or a crash before it brought
        // the durable back with its old floor and no owner, for anyone to adopt).
        let deleted = store.delete_durable(&k);
        // Ended after the deletion, so the name is given back with nothing behind it (floors
        // are written only by this session's acks, for subscriptions it still tracks).
        self.drop_sub(sub_id);
        match deleted {
            Ok(_) => {
                tracing::debug!(conn = %self.conn, durable = ?k.name, "durable subscription deleted");
                Flow::Continue
            }
            Err(e) => self.reply_err(e.code(), e.to_string(), Some(sub_id), None),
        }
    }

    fn on_pub(&mut self, p: Pub, now: Instant) -> Flow {
        let resumed = std::mem::take(&mut self.resumed);
        let path = p.envelope.token_path();
        let need = if p.flags & pub_flags::RETAIN != 0 {
            Rights::of(&[Right::Publish, Right::Retain])
        } else {
            Rights::of(&[Right::Publish])
        };
        // Rights first, without claiming the key id; the claim (`authorize`) only once the
        // plugins and the store accepted the publish: claimed first, a `Pub` they refused
        // kept the key id for the account's group for good.
        if let Err(r) = self.may(path.key_id(), need) {
            self.refused_publish(now);
            return self.refuse(r, None, p.publish_id);
        }
        let info = PublishInfo {
            conn: self.conn,
            path: &path,
            size: p.envelope.len(),
            flags: p.flags,
            qos: p.qos,
        };
        if !resumed {
            if let Err((plugin, why)) = self.shared.plugins.publish(&info) {
                self.shared.metrics.rejected_by_plugin();
                return self.refuse_publish(
                    now,
                    ErrorCode::NotAllowed,
                    format!("refused by {plugin}: {}", why.0),
                    p.publish_id,
                );
            }
        }
        let store = self.shared.router.store().clone();
        if p.qos != Qos::AtMostOnce && store.features() & features::AT_LEAST_ONCE == 0 {
            // Refused like any other publish: a client firing QoS 1 at a relay without a
            // store is slowed, not answered frame by frame (a 25-connection flood of them
            // cost the relay ~120,000 refusals a second).
            return self.refuse_publish(
                now,
                ErrorCode::StoreFailed,
                format!(
                    "this relay has no store (store kind {}): QoS >= 1 publishes cannot be \
                     acknowledged",
                    store.kind()
                ),
                p.publish_id,
            );
        }
        match self.authorize(path.key_id(), need, false) {
            Err(r) => {
                self.refused_publish(now);
                return self.refuse(r, None, p.publish_id);
            }
            Ok(g) => {
                if let Some(line) = g.pending {
                    return self.defer(line, Frame::Pub(p), None);
                }
            }
        }
        let mut walked = 0;
        let accepted = self.shared.router.publish(
            &p.envelope,
            &path,
            p.flags,
            p.qos,
            p.publish_id,
            &self.tenant,
            &mut self.wakes,
            &mut walked,
        );
        // The routing walk's cost beyond the publish's own token (`rate::walk_tokens`):
        // a publish that wildcard filters make expensive to match slows its publisher.
        // (Pending in the JetStream stream: walked, and charged, once it comes back
        // numbered — `when_sequenced`, `walk_debt`.)
        self.charge_walk(crate::rate::walk_tokens(walked), now);
        // What the publish stored counts in the stored-bytes rates (address, account) — when
        // one is set: off (the default) it costs no second look-up of the address's buckets.
        let l = &self.shared.config.limits;
        let store_rated = l.addr_store_rate > 0 || l.account_store_rate > 0;
        if store_rated && matches!(accepted, Ok(Accepted::Pending(_) | Accepted::New(_))) {
            self.charge_shared(Kind::Store, p.envelope.len() as f64, now);
        }
        let seq = match accepted {
            Ok(Accepted::Pending(ticket)) => {
                self.refused_in_a_row = 0;
                self.when_sequenced(&store, ticket, &p);
                return Flow::Continue;
            }
            Ok(Accepted::New(seq) | Accepted::Live(seq)) => seq,
            Ok(Accepted::Duplicate(seq)) => {
                self.shared.metrics.duplicate_publish();
                seq
            }
            Err(e) => {
                return self.refuse_publish(now, e.code(), e.to_string(), p.publish_id);
            }
        };
        self.refused_in_a_row = 0;
        let Some(publish_id) = p.publish_id.filter(|_| p.flags & pub_flags::ACK != 0) else {
            return Flow::Continue;
        };
        let ack = Frame::PubAck(PubAck {
            publish_id,
            seq: seq.0,
        });
        if p.qos == Qos::AtMostOnce {
            return self.send(&ack);
        }
        // QoS >= 1: PubAck once the transaction holding the message committed (owed until
        // then: bounded by the store's queue; it counts towards the reader's pause for
        // replies that back up only once queued, so a store stall leaves the reader reading).
        let reply = self.out.owe_reply();
        let metrics = self.shared.metrics.clone();
        store.when_durable(
            seq,
            Box::new(move |r| {
                let frame = match r {
                    Ok(()) => ack,
                    Err(e) => store_failure(&metrics, &e, publish_id),
                };
                reply.send(codec::encode_prefixed(&frame));
            }),
        );
        Flow::Continue
    }

    /// A publish handed to a store that numbers it elsewhere (the JetStream stream): its
    /// `PubAck` (if asked for) once the stream holds it, with the stream's sequence — the
    /// original's for a QoS 2 duplicate — or `Err` with the store's code.
    fn when_sequenced(&self, store: &Arc<dyn crate::store::Store>, ticket: u64, p: &Pub) {
        let publish_id = p.publish_id.filter(|_| p.flags & pub_flags::ACK != 0);
        let reply = publish_id.map(|_| self.out.owe_reply());
        let metrics = self.shared.metrics.clone();
        // Its walk here is charged to this connection, when it is routed (`owe_walk`).
        // (Weak: a callback the store never calls must not keep the relay alive.)
        let shared = Arc::downgrade(&self.shared);
        let debt = self.walk_debt.clone();
        store.when_sequenced(
            ticket,
            Box::new(move |r| {
                match r {
                    Ok(Accepted::Duplicate(_)) => metrics.duplicate_publish(),
                    Ok(Accepted::New(seq) | Accepted::Live(seq)) => {
                        if let Some(shared) = shared.upgrade() {
                            shared.router.owe_walk(seq, &debt);
                        }
                    }
                    _ => {}
                }
                let (Some(publish_id), Some(reply)) = (publish_id, reply) else {
                    return;
                };
                let frame = match r {
                    Ok(Accepted::New(seq) | Accepted::Duplicate(seq) | Accepted::Live(seq)) => {
                        Frame::PubAck(PubAck {
                            publish_id,
                            seq: seq.0,
                        })
                    }
                    Ok(Accepted::Pending(_)) => return,
                    Err(e) => store_failure(&metrics, &e, publish_id),
                };
                reply.send(codec::encode_prefixed(&frame));
            }),
        );
    }

    /// Whether the account may do `need` on `key_id`, without claiming the key id: its
    /// rights, and no other group holding the key id as far as this relay knows. Checked
    /// before the plugins see a request; [`authorize`](Self::authorize) claims the key id
    /// once the request is accepted.
    fn may(&self, key_id: &whispeer_protocol::KeyId, need: Rights) -> Result<(), Refusal> {
        let accounts = &self.shared.accounts;
        if !accounts.required() {
            return Ok(());
        }
        let Some(who) = self.account.as_deref() else {
            return Err(Refusal {
                code: ErrorCode::AuthFailed,
                message: "the account was removed".into(),
                fatal: true,
            });
        };
        accounts.still_allowed(who, key_id, need)
    }

    /// Checks the account's rights on a key id (and claims it for the account's group, or
    /// refreshes its claim's last use). `pending: Some(line)`: allowed once auth-state line
    /// `line` is on disk (see `defer`); `hold` (asked for by a subscription): keep it while
    /// the subscription lasts. Call it once the request is otherwise accepted (plugins,
    /// store), after [`may`](Self::may).
    fn authorize(
        &self,
        key_id: &whispeer_protocol::KeyId,
        need: Rights,
        hold: bool,
    ) -> Result<crate::accounts::Granted, Refusal> {
        let accounts = &self.shared.accounts;
        if !accounts.required() {
            return Ok(Default::default());
        }
        // Required accounts: every greeted connection has one (as before, none is refused
        // as a removed account would be).
        let Some(who) = self.account.as_deref() else {
            return Err(Refusal {
                code: ErrorCode::AuthFailed,
                message: "the account was removed".into(),
                fatal: true,
            });
        };
        let store = self.shared.router.store();
        accounts.authorize_use(
            who,
            key_id,
            need,
            hold,
            |group, create| store.claim_key(key_id, group, create),
            |k| store.holds_key_id(k),
        )
    }

    /// Holds `frame` until auth-state line `line` (a key-id claim or durable owner it made
    /// or relies on) is on disk: the state file is synced by its own thread, never on this
    /// tokio worker, and the request is answered only once its claim would survive a crash.
    /// The reader stops meanwhile (`deferred_line`, `resume_deferred`), so frames stay in
    /// order. `created`: see [`Session::subscribe`].
    fn defer(&mut self, line: u64, frame: Frame, created: Created) -> Flow {
        self.deferred = Some((line, frame, created));
        Flow::Continue
    }

    /// The auth-state line a held request waits for.
    pub(crate) fn deferred_line(&self) -> Option<u64> {
        self.deferred.as_ref().map(|(line, ..)| *line)
    }

    /// Handles the held request (its line is on disk now; rates were charged already).
    pub(crate) fn resume_deferred(&mut self) -> Flow {
        // Taken at once by `subscribe` / `on_pub`; nothing else is handled in between.
        self.resumed = matches!(self.deferred, Some((_, Frame::Sub(_) | Frame::Pub(_), _)));
        match self.deferred.take() {
            Some((_, Frame::Sub(s), created)) => self.subscribe(s, created),
            Some((_, Frame::Pub(p), _)) => self.on_pub(p, Instant::now()),
            _ => Flow::Continue,
        }
    }

    /// Answers a refused request: fatal when the account is gone.
    fn refuse(&mut self, r: Refusal, sub_id: Option<SubId>, publish_id: Option<[u8; 16]>) -> Flow {
        if r.fatal {
            self.fatal(r.code, r.message, sub_id, publish_id)
        } else {
            self.reply_err(r.code, r.message, sub_id, publish_id)
        }
    }

    /// No inbound traffic within the limit (or no `Hello` in time).
    pub(crate) fn timed_out(&mut self) -> Flow {
        let t = &self.shared.config.timeouts;
        let msg = if self.open {
            format!("no traffic for {} ms", t.idle_ms)
        } else if self.challenge.is_some() {
            format!("no Auth within {} ms", t.hello_ms)
        } else {
            format!("no Hello within {} ms", t.hello_ms)
        };
        self.fatal(ErrorCode::IdleTimeout, msg, None, None)
    }

    /// The relay is shutting down: queue `Close(ShuttingDown)` after whatever is queued.
    pub(crate) fn shutting_down(&mut self) {
        let close = Frame::Close(Close {
            code: ErrorCode::ShuttingDown,
            message: "the relay is shutting down".into(),
        });
        if self.out.close_with(Some(codec::encode_prefixed(&close))) {
            self.reason = "relay shutdown".into();
        }
    }

    /// The connection limit is reached: refuse this connection.
    pub(crate) fn refuse_over_limit(&mut self) -> Flow {
        self.shared.metrics.connection_rejected();
        let max = self.shared.config.limits.max_connections;
        self.fatal(
            ErrorCode::TooManyConnections,
            format!("connection limit of {max} reached"),
            None,
            None,
        )
    }

    /// A newer connection took this one's place before its `Welcome` (the relay is full):
    /// closed with a fatal `Err(too_many_connections)`.
    pub(crate) fn evicted(&mut self) -> Flow {
        self.fatal(
            ErrorCode::TooManyConnections,
            crate::handshakes::EVICTED.into(),
            None,
            None,
        )
    }

    /// The connection's place among those not yet welcomed ([`crate::handshakes`]).
    pub(crate) fn set_ticket(&mut self, ticket: Arc<crate::handshakes::Ticket>) {
        self.ticket = Some(ticket);
    }

    /// The queue began closing for a reason found elsewhere (slow consumer, write error).
    pub(crate) fn closed_elsewhere(&mut self) {
        if self.reason == "open" {
            self.reason = "closed by the writer (slow consumer or write error)".into();
        }
    }

    /// Wakes the writers this connection's publishes queued frames for since the last call.
    /// The reader calls it before it could wait (no whole frame buffered, a turn's end, a
    /// pause); [`finish`](Self::finish) calls it too, so no queued frame waits unwoken.
    pub(crate) fn flush_wakes(&mut self) {
        for out in self.wakes.drain(..) {
            out.wake();
        }
    }

    /// Removes the subscriptions and reports the disconnect to plugins. Idempotent.
    /// The connection's address slot, for a transport that keeps the connection after the
    /// session (see `conn::serve`).
    pub(crate) fn take_slot(&mut self) -> Option<AddrSlot> {
        self.slot.take()
    }

    pub(crate) fn finish(&mut self) {
        self.flush_wakes();
        if self.finished {
            return;
        }
        self.finished = true;
        self.out.close_with(None);
        if self.account.is_some() {
            self.shared.accounts.detach(self.conn);
        }
        self.shared
            .router
            .unsubscribe_all(self.conn, self.subs.iter().map(|(id, p)| (*id, p)));
        self.shared
            .sub_quota
            .remove(&self.tenant, self.subs.values().map(|p| p.elems().len()));
        tracing::debug!(conn = %self.conn, subscriptions = self.subs.len(),
            "connection's subscriptions given back");
        self.subs.clear();
        self.sub_rights.clear();
        self.claim_holds.clear();
        self.tracked.clear();
        self.track_ids.clear();
        self.hold_gens.clear();
        for (_, k) in self.durables.drain() {
            self.shared.release_durable(&k);
        }
        // Only now may the writer end the connection: a client that sees it end and
        // resumes its durable at once finds the name free. (Before the seal, the writer —
        // on another thread, or another runtime after a hop — could end the stream as soon
        // as the queue closed, while this thread had not yet given the name back, and the
        // resume got `busy`.)
        self.out.seal();
        self.shared.plugins.disconnect(
            &DisconnectInfo {
                conn: self.conn,
                transport: self.transport,
                peer: self.peer,
                greeted: self.greeted,
                reason: &self.reason,
                authenticated: self.account.is_some(),
            },
            self.plugins_accepted,
        );
    }

    fn close_quietly(&mut self, reason: &str) {
        if self.out.close_with(None) {
            self.reason = reason.to_owned();
        }
    }

    fn send(&mut self, frame: &Frame) -> Flow {
        let offer = self.out.push_control(codec::encode_prefixed(frame));
        match offer {
            Offer::Queued | Offer::DroppedOldest(_) => Flow::Continue,
            other => self.on_offer_failed(other),
        }
    }

    fn on_offer_failed(&mut self, offer: Offer) -> Flow {
        if offer == Offer::Disconnected {
            self.shared.metrics.slow_consumer_disconnect();
            self.reason = "slow consumer: too many unread replies".into();
        }
        Flow::Close
    }

    fn err_frame(
        code: ErrorCode,
        message: String,
        fatal: bool,
        sub_id: Option<SubId>,
        publish_id: Option<[u8; 16]>,
    ) -> Bytes {
        codec::encode_prefixed(&Frame::Err(ErrFrame {
            code,
            message,
            fatal,
            sub_id: sub_id.map(|s| s.0),
            publish_id,
        }))
    }

    /// A non-fatal error about one request.
    fn reply_err(
        &mut self,
        code: ErrorCode,
        message: String,
        sub_id: Option<SubId>,
        publish_id: Option<[u8; 16]>,
    ) -> Flow {
        self.shared.metrics.error_sent(code);
        let offer = self
            .out
            .push_control(Self::err_frame(code, message, false, sub_id, publish_id));
        match offer {
            Offer::Queued | Offer::DroppedOldest(_) => Flow::Continue,
            other => self.on_offer_failed(other),
        }
    }

    /// A fatal error: queue `Err(fatal)` after what is queued, then close.
    fn fatal(
        &mut self,
        code: ErrorCode,
        message: String,
        sub_id: Option<SubId>,
        publish_id: Option<[u8; 16]>,
    ) -> Flow {
        tracing::debug!(conn = %self.conn, code = code.name(), ?message, "closing connection");
        let frame = Self::err_frame(code, message, true, sub_id, publish_id);
        if self.out.close_with(Some(frame)) {
            self.shared.metrics.error_sent(code);
            self.reason = code.name().to_owned();
        }
        Flow::Close
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::relay::Relay;
    use proptest::prelude::*;
    use whispeer_protocol::frame::{Ack, Msg, Ping, Sub};
    use whispeer_protocol::{KeyId, PatternElem, Qos, TopicToken};

    use crate::test_envelope::envelope;

    fn frame() -> impl Strategy<Value = Frame> {
        let pattern = (
            0u8..2,
            prop::collection::vec(
                prop_oneof![
                    (0u8..3).prop_map(|t| PatternElem::Token(TopicToken::from_bytes([t; 16]))),
                    Just(PatternElem::One),
                ],
                0..4,
            ),
            any::<bool>(),
        )
            .prop_filter_map("valid", |(k, mut e, rest)| {
                if rest {
                    e.push(PatternElem::Rest);
                }
                TokenPattern::new(KeyId::from_bytes([k; 16]), e).ok()
            });
        let path = (0u8..2, prop::collection::vec(0u8..3, 1..4));
        prop_oneof![
            prop::collection::vec(0u64..3, 1..3).prop_map(|versions| Frame::Hello(Hello {
                versions,
                features: 0,
                client: None,
                auth: None,
                account: None
            })),
            (0u64..6, pattern).prop_map(|(sub_id, pattern)| Frame::Sub(Sub {
                sub_id,
                pattern,
                qos: Qos::AtMostOnce,
                durable: None,
                replay: None,
                retained: true,
                credit: None,
                owner: None
            })),
            (0u64..6).prop_map(|sub_id| Frame::Unsub(Unsub {
                sub_id,
                delete: None
            })),
            (path.clone(), 0u64..4, any::<bool>()).prop_map(|((k, p), flags, id)| Frame::Pub(
                Pub {
                    envelope: envelope(k, &p),
                    flags,
                    publish_id: id.then_some([1; 16]),
                    qos: Qos::AtMostOnce
                }
            )),
            path.prop_map(|(k, p)| Frame::Msg(Msg {
                paused: None,
                sub_id: None,
                seq: 1,
                envelope: envelope(k, &p),
                flags: 0
            })),
            any::<u64>().prop_map(|nonce| Frame::Ping(Ping { nonce })),
            Just(Frame::Ack(Ack { seqs: vec![1, 2] })),
            Just(Frame::Close(Close {
                code: ErrorCode::Other(0),
                message: String::new()
            })),
        ]
    }

    fn event() -> impl Strategy<Value = Inbound> {
        prop_oneof![
            6 => frame().prop_map(|f| Inbound::Frame(f.to_bytes())),
            2 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Inbound::Frame(Bytes::from(b))),
            1 => frame().prop_flat_map(|f| {
                let b = f.to_bytes();
                let n = b.len();
                (Just(b), 0..n)
            }).prop_map(|(b, cut)| Inbound::Frame(b.slice(..cut))),
            1 => Just(Inbound::Alive),
            1 => Just(Inbound::Text),
            1 => (0usize..1 << 30).prop_map(|len| Inbound::TooLarge { len }),
        ]
    }

    /// `Hello` with this relay's version.
    fn hello() -> Frame {
        Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            features: 0,
            client: None,
            auth: None,
            account: None,
        })
    }

    /// The filter of key id `[k; 16]`, one level `[1; 16]`.
    fn one_level(k: u8) -> TokenPattern {
        TokenPattern::new(
            KeyId::from_bytes([k; 16]),
            vec![PatternElem::Token(TopicToken::from_bytes([1; 16]))],
        )
        .unwrap()
    }

    /// A QoS 1 `Sub` of `pattern` as the durable "d" with owner secret `[7; 32]` (key id 4's
    /// `DurableKey` is `durable_d_key`).
    fn durable_d(sub_id: u64, pattern: TokenPattern) -> Frame {
        Frame::Sub(Sub {
            sub_id,
            pattern,
            qos: Qos::AtLeastOnce,
            durable: Some("d".into()),
            replay: None,
            retained: false,
            credit: None,
            owner: Some(Bytes::from_static(&[7; 32])),
        })
    }

    /// The durable name "d" under key id `[4; 16]`.
    fn durable_d_key() -> DurableKey {
        DurableKey {
            key_id: KeyId::from_bytes([4; 16]),
            name: "d".into(),
        }
    }

    /// A session of a relay built from `config` (not listening), with an outbound queue
    /// of `capacity` frames.
    fn session(
        config: Config,
        capacity: usize,
        now: Instant,
    ) -> (Session, Arc<Shared>, Arc<Outbound>) {
        let relay = Relay::builder(config).build().unwrap();
        let shared = relay.shared();
        let (s, out) = session_on(&shared, 1, capacity, now);
        (s, shared, out)
    }

    /// Another connection `conn` of the same relay, with an outbound queue of `capacity`
    /// frames.
    fn session_on(
        shared: &Arc<Shared>,
        conn: u64,
        capacity: usize,
        now: Instant,
    ) -> (Session, Arc<Outbound>) {
        let out = Arc::new(Outbound::new(
            capacity,
            usize::MAX,
            shared.config.queue.slow_consumer,
            shared.budget.clone(),
        ));
        let s = Session::new(
            shared.clone(),
            ConnId(conn),
            TransportKind::InProcess,
            None,
            out.clone(),
            now,
            None,
        );
        (s, out)
    }

    /// The writer may end a connection only once the session gave its durable names back:
    /// after the peer's end of stream closes the queue, the writer's batch is not the last
    /// while "d" is still held, and it is once `finish` released it — so a client that sees
    /// the end and resumes at once never finds its own name busy.
    #[tokio::test(flavor = "current_thread")]
    async fn the_writer_ends_a_connection_only_after_its_durables_are_released() {
        let now = Instant::now();
        let (mut s, shared, out) = session(Config::ephemeral(), 64, now);
        assert_eq!(
            s.on_inbound(Inbound::Frame(hello().to_bytes()), now),
            Flow::Continue
        );
        assert_eq!(
            s.on_inbound(Inbound::Frame(durable_d(1, one_level(4)).to_bytes()), now),
            Flow::Continue
        );
        let key = durable_d_key();
        let held = || shared.active_durables.lock().unwrap().contains(&key);
        assert!(held());
        // The peer hangs up: the queue closes at once.
        assert_eq!(s.on_inbound(Inbound::Closed, now), Flow::Close);
        assert!(out.is_closing());
        let mut frames = Vec::new();
        assert!(
            !out.take(&mut frames).last,
            "the writer could end the connection while \"d\" is still held"
        );
        s.finish();
        assert!(!held(), "finish gives the name back");
        assert!(out.take(&mut frames).last, "and then lets the writer end");
    }

    /// A new durable is recorded at the relay's last sequence before its `Sub` is answered:
    /// a `Sub` whose `SubOk` cannot be queued (here: a queue holding only the `Welcome`)
    /// leaves it there, not at 0 — resumed from 0 it replayed the key id's whole history,
    /// to an account without the replay right too.
    #[tokio::test(flavor = "current_thread")]
    async fn a_durable_whose_sub_ok_was_lost_does_not_start_at_the_beginning() {
        let now = Instant::now();
        let (mut publ, shared, _out) = session(Config::ephemeral(), 64, now);
        let send = |s: &mut Session, f: Frame| s.on_inbound(Inbound::Frame(f.to_bytes()), now);
        assert_eq!(send(&mut publ, hello()), Flow::Continue);
        for i in 0..3u8 {
            let p = Frame::Pub(Pub {
                envelope: envelope(4, &[1]),
                flags: 0,
                publish_id: Some([i; 16]),
                qos: Qos::AtLeastOnce,
            });
            assert_eq!(send(&mut publ, p), Flow::Continue);
        }
        let last = shared.router.last_seq().0;
        assert!(last >= 3, "published: {last}");
        let (mut s, _) = session_on(&shared, 2, 1, now);
        assert_eq!(send(&mut s, hello()), Flow::Continue);
        // The SubOk finds the queue full: the connection closes.
        assert_eq!(send(&mut s, durable_d(1, one_level(4))), Flow::Close);
        s.finish();
        let floor = shared.router.store().durable(&durable_d_key()).unwrap();
        assert_eq!(floor, Some(last), "recorded where it started");
    }

    /// A lost-hold notice ends only the subscription that took that very hold: after the
    /// name is unsubscribed and subscribed again, a late notice about the first hold leaves
    /// the new subscription alone; a notice about the new hold ends it with a non-fatal
    /// `Err(not_allowed)` naming it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_hold_lost_notice_does_not_end_a_resubscribed_durable() {
        let now = Instant::now();
        let (mut s, _shared, out) = session(Config::ephemeral(), 64, now);
        let send = |s: &mut Session, f: Frame| {
            assert_eq!(
                s.on_inbound(Inbound::Frame(f.to_bytes()), now),
                Flow::Continue
            );
        };
        send(&mut s, hello());
        let pattern = one_level(4);
        let durable = |sub_id| durable_d(sub_id, pattern.clone());
        let key = durable_d_key();
        // No channel for hold notices until a durable subscription needs one (~2 KiB that
        // every idle connection held), then exactly one receiver for the read loop.
        assert!(s.take_hold_lost().is_none(), "made before any durable");
        send(&mut s, durable(1));
        let _notices = s.take_hold_lost().expect("made by the first durable");
        assert!(s.take_hold_lost().is_none(), "handed out once");
        send(
            &mut s,
            Frame::Unsub(Unsub {
                sub_id: 1,
                delete: None,
            }),
        );
        send(&mut s, durable(2));
        let mut frames = Vec::new();
        out.take(&mut frames);
        let errs = |frames: &[Bytes]| -> Vec<ErrFrame> {
            frames
                .iter()
                .filter_map(|f| match Frame::decode(&f.slice(4..)) {
                    Ok(Frame::Err(e)) => Some(e),
                    _ => None,
                })
                .collect()
        };
        assert!(
            errs(&frames).is_empty(),
            "both subscribes accepted: {:?}",
            errs(&frames)
        );
        // The first hold's notice, late: nothing happens.
        assert_eq!(s.hold_lost(key.clone(), 1), Flow::Continue);
        frames.clear();
        out.take(&mut frames);
        assert!(errs(&frames).is_empty(), "a stale notice ends nothing");
        assert_eq!(s.subscription_count(), 1);
        // The current hold's notice ends the subscription.
        assert_eq!(s.hold_lost(key, 2), Flow::Continue);
        frames.clear();
        out.take(&mut frames);
        let e = errs(&frames);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            (e[0].code, e[0].sub_id, e[0].fatal),
            (ErrorCode::Busy, Some(2), false)
        );
        assert_eq!(s.subscription_count(), 0);
    }

    /// A durable name is the client's choice: the warning that its hold lapsed shows it
    /// escaped, so a newline cannot forge a second log line nor an ESC colour a terminal
    /// (tracing's text format writes `%` fields raw).
    #[tokio::test(flavor = "current_thread")]
    async fn a_durable_name_is_logged_escaped() {
        let now = Instant::now();
        let (mut s, _shared, _out) = session(Config::ephemeral(), 64, now);
        let name = "a\nb\x1b[31m";
        let send = |s: &mut Session, f: Frame| s.on_inbound(Inbound::Frame(f.to_bytes()), now);
        assert_eq!(send(&mut s, hello()), Flow::Continue);
        let sub = Frame::Sub(Sub {
            sub_id: 1,
            pattern: one_level(4),
            qos: Qos::AtLeastOnce,
            durable: Some(name.into()),
            replay: None,
            retained: false,
            credit: None,
            owner: Some(Bytes::from_static(&[7; 32])),
        });
        assert_eq!(send(&mut s, sub), Flow::Continue);
        assert_eq!(s.subscription_count(), 1);
        let key = DurableKey {
            key_id: KeyId::from_bytes([4; 16]),
            name: name.into(),
        };
        let log = crate::logging::captured("trace", || {
            assert_eq!(s.hold_lost(key, 1), Flow::Continue);
        });
        assert_eq!(s.subscription_count(), 0, "the hold's subscription ended");
        let line = log
            .lines()
            .find(|l| l.contains("its cluster hold lapsed"))
            .unwrap_or_else(|| panic!("no warning in {log:?}"));
        assert!(line.contains(r#"durable="a\nb\u{1b}[31m""#), "{line}");
        assert!(!log.contains("a\nb"), "{log:?}");
        assert!(!log.contains('\x1b'), "{log:?}");
    }

    /// An account's rate buckets are its identity's ([`Account::owner`]), not its name's:
    /// the same account connecting again shares its drained buckets, while the name removed
    /// and added again with a new id — or a legacy entry of the name, without id — is
    /// another account and starts with full ones.
    #[test]
    fn account_rate_buckets_are_keyed_by_the_account_identity_not_its_name() {
        let mut config = Config::ephemeral();
        config.limits.account_publish_rate = 1;
        config.limits.account_publish_burst = 1;
        let now = Instant::now();
        let (_s, shared, _out) = session(config, 64, now);
        let alice = |id: Option<[u8; 16]>| {
            Arc::new(Account {
                name: "alice".into(),
                id,
                group: "alice".into(),
                rights: Rights::all(),
            })
        };
        // The account buckets a new connection of `acct` charges.
        let buckets = |conn: u64, acct: Arc<Account>| {
            let (mut s, _) = session_on(&shared, conn, 64, now);
            s.set_account(acct, Credential::token(b"alice's token"));
            s.account_rates.clone().expect("an account's buckets")
        };
        let first = buckets(2, alice(Some([1; 16])));
        assert_eq!(
            first.take(Kind::Publish, 1.0, now),
            None,
            "within the burst"
        );
        assert!(first.take(Kind::Publish, 1.0, now).is_some(), "drained");
        assert!(
            buckets(3, alice(Some([1; 16])))
                .take(Kind::Publish, 1.0, now)
                .is_some(),
            "the same account connecting again shares the drained buckets"
        );
        assert_eq!(
            buckets(4, alice(Some([2; 16]))).take(Kind::Publish, 1.0, now),
            None,
            "the name added again with a new id: another account, full buckets"
        );
        assert_eq!(
            buckets(5, alice(None)).take(Kind::Publish, 1.0, now),
            None,
            "a legacy entry of the name: another account too"
        );
    }

    /// An `Ack` frame costs work in proportion to its distinct sequences and to the
    /// deliveries it frees, never to sequences × subscriptions: over 1000 QoS 1
    /// subscriptions of one filter holding one message, frames of 4096 unknown or repeated
    /// sequences look nothing up in the subscriptions, and the ack of the delivered message
    /// frees it in every subscription holding it (1000 removals, once).
    #[test]
    fn ack_work_is_bounded_by_its_sequences_and_what_it_frees() {
        let mut config = Config::ephemeral();
        config.limits.publish_rate = 0;
        config.limits.addr_publish_rate = 0;
        let subs = config.limits.max_subscriptions as u64;
        let now = Instant::now();
        let (mut s, shared, out) = session(config, 1 << 14, now);
        let send = |s: &mut Session, f: Frame| {
            assert_eq!(
                s.on_inbound(Inbound::Frame(f.to_bytes()), now),
                Flow::Continue
            );
        };
        send(&mut s, hello());
        for sub_id in 1..=subs {
            send(
                &mut s,
                Frame::Sub(Sub {
                    qos: Qos::AtLeastOnce,
                    ..Sub::live(sub_id, one_level(1))
                }),
            );
        }
        let (mut publ, _) = session_on(&shared, 2, 64, now);
        send(&mut publ, hello());
        send(
            &mut publ,
            Frame::Pub(Pub {
                envelope: envelope(1, &[1]),
                flags: 0,
                publish_id: Some([1; 16]),
                qos: Qos::AtLeastOnce,
            }),
        );
        let mut frames = Vec::new();
        out.take(&mut frames);
        let seqs: Vec<u64> = frames
            .iter()
            .filter_map(|f| match Frame::decode(&f.slice(4..)) {
                Ok(Frame::Msg(m)) => Some(m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs.len(), 1, "one message frame for the connection");
        let seq = seqs[0];
        assert_eq!(
            s.unacked_deliveries() as u64,
            subs,
            "held by every subscription"
        );
        // Unknown sequences, repeated: nothing to look up in any subscription.
        for absent in [seq + 1, seq + 7, 0] {
            send(
                &mut s,
                Frame::Ack(Ack {
                    seqs: vec![absent; 4096],
                }),
            );
        }
        send(
            &mut s,
            Frame::Ack(Ack {
                seqs: (seq + 1..seq + 4097).collect(),
            }),
        );
        assert_eq!(s.unacked_deliveries() as u64, subs, "nothing freed");
        let absent_work = s.ack_work;
        // The delivered message, 4096 times in one frame: freed once in each subscription.
        send(
            &mut s,
            Frame::Ack(Ack {
                seqs: vec![seq; 4096],
            }),
        );
        assert_eq!(s.unacked_deliveries(), 0, "freed in every subscription");
        let freeing_work = s.ack_work - absent_work;
        // Acked already: nothing left to look up.
        for _ in 0..3 {
            send(
                &mut s,
                Frame::Ack(Ack {
                    seqs: vec![seq; 4096],
                }),
            );
        }
        let repeated_work = s.ack_work - absent_work - freeing_work;
        eprintln!(
            "ack work: absent {absent_work}, freeing {freeing_work}, repeated {repeated_work}"
        );
        assert_eq!(absent_work, 0, "unknown sequences");
        assert_eq!(
            freeing_work, subs,
            "one removal per subscription holding it"
        );
        assert_eq!(repeated_work, 0, "acked again");
        // A subscription's end takes its deliveries out of the index: the next message's ack
        // touches only the one subscription left.
        send(
            &mut publ,
            Frame::Pub(Pub {
                envelope: envelope(1, &[1]),
                flags: 0,
                publish_id: Some([2; 16]),
                qos: Qos::AtLeastOnce,
            }),
        );
        assert_eq!(s.unacked_deliveries() as u64, subs);
        for sub_id in 2..=subs {
            send(
                &mut s,
                Frame::Unsub(Unsub {
                    sub_id,
                    delete: None,
                }),
            );
        }
        assert_eq!(s.unacked_deliveries(), 1);
        let before = s.ack_work;
        send(
            &mut s,
            Frame::Ack(Ack {
                seqs: (1..4097).collect(),
            }),
        );
        assert_eq!(s.unacked_deliveries(), 0);
        assert_eq!(s.ack_work - before, 1, "the one subscription left");
    }

    /// A publisher's session queues its messages for a subscriber without waking the
    /// subscriber's writer; `flush_wakes` (called by the reader at a turn's end or before it
    /// may wait) wakes it once for all of them — and `finish` flushes too, so no queued
    /// message waits unwoken when the publisher goes away.
    #[test]
    fn publishes_wake_a_subscribers_writer_once_when_flushed() {
        use futures_util::FutureExt;
        let mut config = Config::ephemeral();
        config.limits.publish_rate = 0;
        config.limits.addr_publish_rate = 0;
        let now = Instant::now();
        let (mut sub, shared, sub_out) = session(config, 64, now);
        let hello = hello();
        let pattern = one_level(1);
        for f in [hello.clone(), Frame::Sub(Sub::live(1, pattern))] {
            assert_eq!(
                sub.on_inbound(Inbound::Frame(f.to_bytes()), now),
                Flow::Continue
            );
        }
        let mut frames = Vec::new();
        sub_out.take(&mut frames); // Welcome, SubOk
        while sub_out.wait().now_or_never().is_some() {} // their wake-ups
        let (mut publ, _) = session_on(&shared, 2, 64, now);
        assert_eq!(
            publ.on_inbound(Inbound::Frame(hello.to_bytes()), now),
            Flow::Continue
        );
        let publish = |publ: &mut Session| {
            let p = Frame::Pub(Pub {
                envelope: envelope(1, &[1]),
                flags: 0,
                publish_id: None,
                qos: Qos::AtMostOnce,
            });
            assert_eq!(
                publ.on_inbound(Inbound::Frame(p.to_bytes()), now),
                Flow::Continue
            );
        };
        for _ in 0..10 {
            publish(&mut publ);
        }
        assert_eq!(sub_out.queued(), 10);
        assert!(
            sub_out.wait().now_or_never().is_none(),
            "woken before the flush"
        );
        publ.flush_wakes();
        assert!(
            sub_out.wait().now_or_never().is_some(),
            "the flush wakes the writer"
        );
        assert!(sub_out.wait().now_or_never().is_none(), "once");
        // Queued and not flushed when the publisher's connection ends: finish wakes.
        sub_out.take(&mut frames);
        publish(&mut publ);
        assert!(sub_out.wait().now_or_never().is_none());
        publ.finish();
        assert!(sub_out.wait().now_or_never().is_some(), "finish flushes");
    }

    /// Refused publishes in a row pause the reader longer each time; an accepted one resets.
    #[test]
    fn refused_publishes_in_a_row_pause_the_reader_longer_each_time() {
        let mut config = Config::ephemeral();
        config.store.tenant_max_messages = 1;
        config.limits.publish_rate = 0;
        config.limits.addr_publish_rate = 0;
        let now = Instant::now();
        let (mut s, shared, _out) = session(config, 64, now);
        let hello = hello();
        assert_eq!(
            s.on_inbound(Inbound::Frame(hello.to_bytes()), now),
            Flow::Continue
        );
        let publish = |s: &mut Session, k: u8, qos: Qos| {
            let p = Frame::Pub(Pub {
                envelope: envelope(k, &[1]),
                flags: pub_flags::ACK,
                publish_id: Some([k; 16]),
                qos,
            });
            assert_eq!(
                s.on_inbound(Inbound::Frame(p.to_bytes()), now),
                Flow::Continue
            );
            s.take_pause().map(|until| until - now)
        };
        assert_eq!(
            publish(&mut s, 1, Qos::AtLeastOnce),
            None,
            "within the quota"
        );
        let pauses: Vec<_> = (2..6)
            .map(|k| publish(&mut s, k, Qos::AtLeastOnce))
            .collect();
        assert_eq!(
            pauses,
            [1, 2, 4, 8].map(|n| Some(REFUSAL_PAUSE * n)).to_vec(),
            "each refusal in a row doubles the pause"
        );
        assert_eq!(
            publish(&mut s, 9, Qos::AtMostOnce),
            None,
            "a live publish is accepted"
        );
        assert_eq!(
            publish(&mut s, 10, Qos::AtLeastOnce),
            Some(REFUSAL_PAUSE),
            "and the next refusal starts over"
        );
        for _ in 0..40 {
            publish(&mut s, 11, Qos::AtLeastOnce);
        }
        assert_eq!(
            publish(&mut s, 12, Qos::AtLeastOnce),
            Some(REFUSAL_PAUSE * (1 << (MAX_REFUSAL_DOUBLINGS - 1))),
            "capped"
        );
        assert!(shared
            .metrics
            .render_prometheus(0)
            .contains("whispeer_relay_refusal_pauses_total 46"));
    }

    /// A QoS 1 publish to a relay without a store is refused like any other: the reader
    /// pauses, longer for each such refusal in a row.
    #[test]
    fn qos1_publishes_to_a_relay_without_a_store_pause_the_reader() {
        let mut config = Config::ephemeral();
        config.store.kind = Some(crate::config::StoreKind::None);
        config.limits.publish_rate = 0;
        config.limits.addr_publish_rate = 0;
        let now = Instant::now();
        let (mut s, _shared, out) = session(config, 64, now);
        assert_eq!(
            s.on_inbound(Inbound::Frame(hello().to_bytes()), now),
            Flow::Continue
        );
        let pauses: Vec<_> = (1..4)
            .map(|k| {
                let p = Frame::Pub(Pub {
                    envelope: envelope(k, &[1]),
                    flags: pub_flags::ACK,
                    publish_id: Some([k; 16]),
                    qos: Qos::AtLeastOnce,
                });
                assert_eq!(
                    s.on_inbound(Inbound::Frame(p.to_bytes()), now),
                    Flow::Continue
                );
                s.take_pause().map(|until| until - now)
            })
            .collect();
        assert_eq!(pauses, [1, 2, 4].map(|n| Some(REFUSAL_PAUSE * n)).to_vec());
        let mut frames = Vec::new();
        out.take(&mut frames);
        let errs = frames
            .iter()
            .filter(|f| matches!(Frame::decode(&f.slice(4..)), Ok(Frame::Err(e)) if e.code == ErrorCode::StoreFailed))
            .count();
        assert_eq!(errs, 3, "each refusal answered");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary event sequences never panic; everything queued decodes; limits hold;
        /// a finished session leaves nothing in the index.
        #[test]
        fn session_never_panics_and_cleans_up(events in prop::collection::vec(event(), 0..40)) {
            let mut config = Config::ephemeral();
            config.limits.max_subscriptions = 3;
            config.queue.capacity = 16;
            let now = Instant::now();
            let (mut s, shared, out) = session(config, 16, now);
            let mut closed = false;
            for ev in events {
                if s.on_inbound(ev, now) == Flow::Close {
                    closed = true;
                    break;
                }
                prop_assert!(s.subscription_count() <= 3);
            }
            let mut frames = Vec::new();
            out.take(&mut frames);
            for f in &frames {
                prop_assert!(Frame::decode(&f.slice(4..)).is_ok());
            }
            if closed {
                prop_assert!(out.is_closing());
            }
            s.finish();
            prop_assert_eq!(shared.metrics.snapshot().subscriptions, 0);
        }
    }
}
