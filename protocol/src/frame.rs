//! Relay frames: what client and relay say to each other, above the transport framing and
//! around the opaque envelope.
//!
//! Every frame is one CBOR map with unsigned-integer keys. Key `0` holds the frame type and
//! comes first; the other keys are per type (see `docs/PROTOCOL.md`). Decoders skip keys they
//! do not know, so fields can be added without a version bump; encoders write keys in
//! ascending order with the shortest integer forms. Indefinite lengths and tags are rejected.

use bytes::Bytes;

use crate::cbor::{Reader, Writer};
use crate::envelope_header::Envelope;
use crate::error::DecodeError;
use crate::limits::{MAX_ACKS_PER_FRAME, MAX_FRAME_CEILING, MAX_LEVELS, MAX_TEXT_LEN, TOKEN_LEN};
use crate::token::{KeyId, PatternElem, TokenPattern, TopicToken};

/// The relay protocol version this crate speaks. Version 2 (wave 2) added relay accounts
/// (`Hello.account`, `Challenge`, `Auth`), per-subscription credit and durable owners
/// (`Sub` keys 8 and 9), and error codes 18–22; its envelopes and key strings are version 2
/// as well, so a version-1 peer is refused with `UnsupportedVersion`.
pub const PROTOCOL_VERSION: u64 = 2;
/// Most versions a `Hello` may offer.
pub const MAX_OFFERED_VERSIONS: usize = 8;
/// Largest `auth` blob (a bearer token) in a `Hello`.
pub const MAX_AUTH_LEN: usize = 1024;
/// Shortest and longest durable owner secret in a `Sub`.
pub const OWNER_LEN: std::ops::RangeInclusive<usize> = 16..=64;
/// Context string of the relay-account signature (`Auth`), never used for messages.
pub const AUTH_CONTEXT: &[u8] = b"whispeer/v2/relay-auth\0";

/// The bytes a relay account signs in `Auth`: `AUTH_CONTEXT ‖ nonce ‖ account`. Binding the
/// account key keeps a signature from being replayed under another account; the relay's
/// fresh random nonce keeps it from being replayed at all.
pub fn auth_sig_input(nonce: &[u8; 32], account: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_CONTEXT.len() + 64);
    m.extend_from_slice(AUTH_CONTEXT);
    m.extend_from_slice(nonce);
    m.extend_from_slice(account);
    m
}

/// Feature bits exchanged in `Hello`/`Welcome`.
pub mod features {
    /// `PubAck` after durable storage; subscriber `Ack`s; redelivery.
    pub const AT_LEAST_ONCE: u64 = 1 << 0;
    /// Publish-id dedup window (exactly-once, with client-side dedup).
    pub const EXACTLY_ONCE: u64 = 1 << 1;
    /// Retained last value per token path.
    pub const RETAIN: u64 = 1 << 2;
    /// Replay from sequence, time or last N.
    pub const REPLAY: u64 = 1 << 3;
    /// Named durable subscriptions.
    pub const DURABLE: u64 = 1 << 4;
    /// The relay honours `Sub.credit`: at most that many unacknowledged QoS ≥ 1 messages
    /// in flight per subscription; the rest wait in the store.
    pub const FLOW_CONTROL: u64 = 1 << 5;
}

/// Picks the version both sides speak: the highest offered version this crate supports.
pub fn negotiate_version(offered: &[u64]) -> Option<u64> {
    offered
        .iter()
        .copied()
        .filter(|v| *v == PROTOCOL_VERSION)
        .max()
}

/// Delivery guarantee of a publish or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Qos {
    /// Live fan-out only (the default).
    #[default]
    AtMostOnce = 0,
    /// Nothing acknowledged is lost.
    AtLeastOnce = 1,
    /// At least once plus dedup on the relay and in the client.
    ExactlyOnce = 2,
}

impl Qos {
    /// From the wire value.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

/// Where a subscription starts reading history before it continues live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Replay {
    /// Every stored message with relay sequence `>= seq`.
    FromSeq(u64),
    /// Every stored message the relay received at or after this Unix time in milliseconds.
    SinceMs(u64),
    /// The last `n` stored messages per matching path.
    LastN(u64),
}

/// Error codes carried by `Err` frames. Unknown codes from newer peers decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame could not be decoded.
    Malformed,
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame type the peer does not know.
    UnknownFrame,
    /// A frame larger than `max_frame`.
    FrameTooLarge,
    /// A filter the relay refuses (shape, depth).
    InvalidFilter,
    /// Subscription limit per connection reached.
    TooManySubscriptions,
    /// Publish rate limit exceeded.
    RateLimited,
    /// Connection limit reached.
    TooManyConnections,
    /// Refused by policy (auth, a plugin).
    NotAllowed,
    /// The connection could not keep up and is being closed.
    SlowConsumer,
    /// The relay is shutting down.
    ShuttingDown,
    /// No traffic within the idle timeout.
    IdleTimeout,
    /// The relay failed internally.
    Internal,
    /// The store could not take the message; it was not acknowledged.
    StoreFailed,
    /// A frame out of order (e.g. `Pub` before `Hello`).
    ProtocolViolation,
    /// An envelope whose header is malformed.
    InvalidEnvelope,
    /// `Unsub` or `Ack` for a subscription that does not exist.
    UnknownSubscription,
    /// A quota (stored bytes or messages, retained entries, durable names, paths) of the
    /// account or of the relay is used up; the publish or subscription was refused.
    QuotaExceeded,
    /// The relay is busy (its store queue is full); retry later. Nothing was accepted.
    Busy,
    /// The relay requires authentication and the `Hello` carried none.
    AuthRequired,
    /// Authentication failed (unknown account, bad signature or token), or the account may
    /// not do what was asked on this key id.
    AuthFailed,
    /// The relay's storage is full; publishes that need the store are refused until space
    /// frees. Live routing goes on. Retry later.
    StorageFull,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::UnknownFrame => 3,
            ErrorCode::FrameTooLarge => 4,
            ErrorCode::InvalidFilter => 5,
            ErrorCode::TooManySubscriptions => 6,
            ErrorCode::RateLimited => 7,
            ErrorCode::TooManyConnections => 8,
            ErrorCode::NotAllowed => 9,
            ErrorCode::SlowConsumer => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::IdleTimeout => 12,
            ErrorCode::Internal => 13,
            ErrorCode::StoreFailed => 14,
            ErrorCode::ProtocolViolation => 15,
            ErrorCode::InvalidEnvelope => 16,
            ErrorCode::UnknownSubscription => 17,
            ErrorCode::QuotaExceeded => 18,
            ErrorCode::Busy => 19,
            ErrorCode::AuthRequired => 20,
            ErrorCode::AuthFailed => 21,
            ErrorCode::StorageFull => 22,
            ErrorCode::Other(c) => c,
        }
    }
    /// From the wire value.
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::UnknownFrame,
            4 => ErrorCode::FrameTooLarge,
            5 => ErrorCode::InvalidFilter,
            6 => ErrorCode::TooManySubscriptions,
            7 => ErrorCode::RateLimited,
            8 => ErrorCode::TooManyConnections,
            9 => ErrorCode::NotAllowed,
            10 => ErrorCode::SlowConsumer,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::IdleTimeout,
            13 => ErrorCode::Internal,
            14 => ErrorCode::StoreFailed,
            15 => ErrorCode::ProtocolViolation,
            16 => ErrorCode::InvalidEnvelope,
            17 => ErrorCode::UnknownSubscription,
            18 => ErrorCode::QuotaExceeded,
            19 => ErrorCode::Busy,
            20 => ErrorCode::AuthRequired,
            21 => ErrorCode::AuthFailed,
            22 => ErrorCode::StorageFull,
            c => ErrorCode::Other(c),
        }
    }
    /// A stable snake_case name, for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownFrame => "unknown_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::InvalidEnvelope => "invalid_envelope",
            ErrorCode::UnknownSubscription => "unknown_subscription",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::Other(_) => "other",
        }
    }
    /// Whether the same request may succeed later unchanged (the client should back off
    /// and retry rather than report a permanent failure).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Busy
                | ErrorCode::StorageFull
                | ErrorCode::StoreFailed
                | ErrorCode::TooManyConnections
                | ErrorCode::ShuttingDown
        )
    }
}

/// Client → relay, first frame: the versions and features the client speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Offered protocol versions (1..=8 of them).
    pub versions: Vec<u64>,
    /// Feature bits the client wants ([`features`]).
    pub features: u64,
    /// Optional client software name, for logs.
    pub client: Option<String>,
    /// Optional bearer token of a relay account (services). Never the message-signing
    /// identity.
    pub auth: Option<Bytes>,
    /// Optional Ed25519 public key of a relay account: the relay answers with `Challenge`
    /// and the client proves the key with `Auth`. A key of its own, never the identity
    /// that signs messages (that would link senders to connections).
    pub account: Option<[u8; 32]>,
}

/// Relay → client, answer to a `Hello` naming an account: sign this nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// 32 fresh random bytes.
    pub nonce: [u8; 32],
}

/// Client → relay, answer to `Challenge`: Ed25519 signature by the account key over
/// [`auth_sig_input`]. The relay then sends `Welcome` or a fatal `Err(AuthFailed)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// The signature (64 bytes).
    pub sig: [u8; 64],
}

/// Relay → client, answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The chosen version.
    pub version: u64,
    /// Feature bits the relay grants.
    pub features: u64,
    /// Largest frame the relay accepts.
    pub max_frame: u64,
    /// A random session id (scopes publish-id dedup).
    pub session: [u8; 16],
    /// Optional relay software name.
    pub relay: Option<String>,
    /// Interval at which the client should send `Ping` if otherwise idle (0 = none).
    pub heartbeat_ms: u64,
}

/// Client → relay: subscribe to a token pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sub {
    /// Client-chosen id, unique per connection.
    pub sub_id: u64,
    /// The compiled filter.
    pub pattern: TokenPattern,
    /// Delivery guarantee wanted.
    pub qos: Qos,
    /// Name of a durable subscription to resume.
    pub durable: Option<String>,
    /// Where to start in history.
    pub replay: Option<Replay>,
    /// Deliver retained values of matching paths first (default true).
    pub retained: bool,
    /// For QoS ≥ 1: most unacknowledged messages in flight on this subscription (like
    /// JetStream's MaxAckPending). `None`: the relay's default. The relay keeps the rest in
    /// its store and sends them as acks free credit.
    pub credit: Option<u64>,
    /// Owner secret of a durable subscription (16–64 bytes) when the connection has no
    /// relay account: only a `Sub` with the same secret may resume, ack or replace it.
    pub owner: Option<Bytes>,
}

/// Client → relay: drop a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsub {
    /// The id given in `Sub`.
    pub sub_id: u64,
}

/// Relay → client: a subscription is active (live messages after this frame match it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOk {
    /// The id given in `Sub`.
    pub sub_id: u64,
    /// The relay's last assigned sequence when the subscription became live (0 if none).
    pub seq: u64,
}

/// Flag bits of a `Pub` frame.
pub mod pub_flags {
    /// Keep this envelope as the retained value of its exact token path.
    pub const RETAIN: u64 = 1 << 0;
    /// Answer with `PubAck` once the message is accepted (stored for QoS ≥ 1).
    pub const ACK: u64 = 1 << 1;
}

/// Client → relay: publish an envelope. The relay reads the route from the envelope header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pub {
    /// The sealed envelope.
    pub envelope: Envelope,
    /// [`pub_flags`] bits.
    pub flags: u64,
    /// Random 128-bit id for `PubAck` and relay-side dedup (required with `ACK`).
    pub publish_id: Option<[u8; 16]>,
    /// Delivery guarantee wanted.
    pub qos: Qos,
}

/// Flag bits of a `Msg` frame.
pub mod msg_flags {
    /// This is the retained value, delivered on subscribe.
    pub const RETAINED: u64 = 1 << 0;
    /// Delivered before and not acknowledged.
    pub const REDELIVERED: u64 = 1 << 1;
    /// Read from history (replay), not live.
    pub const REPLAYED: u64 = 1 << 2;
}

/// Relay → client: a message. Carries nothing specific to one subscriber, so the relay
/// encodes it once for all; the client matches the envelope's tokens to its own filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Relay sequence (strictly increasing per relay store; 0 when not stored).
    pub seq: u64,
    /// The envelope exactly as published.
    pub envelope: Envelope,
    /// [`msg_flags`] bits.
    pub flags: u64,
}

/// Client → relay: acknowledge delivered sequences (QoS ≥ 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Acknowledged relay sequences (at most [`MAX_ACKS_PER_FRAME`]).
    pub seqs: Vec<u64>,
}

/// Relay → client: a publish was accepted (and stored, for QoS ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAck {
    /// The publish id from `Pub`.
    pub publish_id: [u8; 16],
    /// The relay sequence assigned (0 when not stored).
    pub seq: u64,
}

/// Either side: an error. `fatal` means the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail (never envelope bytes).
    pub message: String,
    /// Whether the connection is closed after this frame.
    pub fatal: bool,
    /// The subscription concerned, if any.
    pub sub_id: Option<u64>,
    /// The publish concerned, if any.
    pub publish_id: Option<[u8; 16]>,
}

/// Liveness probe; answered with `Pong` carrying the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in the `Pong`.
    pub nonce: u64,
}

/// Answer to `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// The `Ping`'s nonce.
    pub nonce: u64,
}

/// Relay → client: messages were dropped for this connection (slow-consumer policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// How many messages were dropped since the last `Gap`.
    pub dropped: u64,
}

/// Relay → client: the history of a replaying (or resumed durable) subscription has been
/// sent; every later `Msg` for it is live. Sent only to clients granted [`features::REPLAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayDone {
    /// The id given in `Sub`.
    pub sub_id: u64,
    /// The boundary: history covered sequences up to and including this one (the `SubOk` seq).
    pub seq: u64,
    /// How many history messages were sent.
    pub count: u64,
}

/// Either side: orderly close (e.g. the relay is shutting down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Reason, as an error code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Sub(Sub),
    Unsub(Unsub),
    SubOk(SubOk),
    Pub(Pub),
    Msg(Msg),
    Ack(Ack),
    PubAck(PubAck),
    Err(ErrFrame),
    Ping(Ping),
    Pong(Pong),
    Gap(Gap),
    Close(Close),
    ReplayDone(ReplayDone),
    Challenge(Challenge),
    Auth(Auth),
}

/// Frame type numbers (key 0 of every frame).
pub mod frame_type {
    pub const HELLO: u64 = 1;
    pub const WELCOME: u64 = 2;
    pub const SUB: u64 = 3;
    pub const UNSUB: u64 = 4;
    pub const SUB_OK: u64 = 5;
    pub const PUB: u64 = 6;
    pub const MSG: u64 = 7;
    pub const ACK: u64 = 8;
    pub const PUB_ACK: u64 = 9;
    pub const ERR: u64 = 10;
    pub const PING: u64 = 11;
    pub const PONG: u64 = 12;
    pub const GAP: u64 = 13;
    pub const CLOSE: u64 = 14;
    pub const REPLAY_DONE: u64 = 15;
    pub const CHALLENGE: u64 = 16;
    pub const AUTH: u64 = 17;
}

const ELEM_ONE: u64 = 1;
const ELEM_REST: u64 = 2;
const REPLAY_FROM_SEQ: u64 = 1;
const REPLAY_SINCE_MS: u64 = 2;
const REPLAY_LAST_N: u64 = 3;

impl Frame {
    /// The frame's type name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Sub(_) => "Sub",
            Frame::Unsub(_) => "Unsub",
            Frame::SubOk(_) => "SubOk",
            Frame::Pub(_) => "Pub",
            Frame::Msg(_) => "Msg",
            Frame::Ack(_) => "Ack",
            Frame::PubAck(_) => "PubAck",
            Frame::Err(_) => "Err",
            Frame::Ping(_) => "Ping",
            Frame::Pong(_) => "Pong",
            Frame::Gap(_) => "Gap",
            Frame::Close(_) => "Close",
            Frame::ReplayDone(_) => "ReplayDone",
            Frame::Challenge(_) => "Challenge",
            Frame::Auth(_) => "Auth",
        }
    }

    /// Encodes the frame (without transport framing) into a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.size_hint());
        self.encode(&mut out);
        Bytes::from(out)
    }

    fn size_hint(&self) -> usize {
        match self {
            Frame::Pub(p) => p.envelope.len() + 40,
            Frame::Msg(m) => m.envelope.len() + 24,
            _ => 64,
        }
    }

    /// Appends the CBOR encoding of the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match self {
            Frame::Hello(h) => {
                w.map(
                    3 + h.client.is_some() as usize
                        + h.auth.is_some() as usize
                        + h.account.is_some() as usize,
                );
                w.uint(0);
                w.uint(frame_type::HELLO);
                w.uint(1);
                w.array(h.versions.len());
                h.versions.iter().for_each(|v| w.uint(*v));
                w.uint(2);
                w.uint(h.features);
                if let Some(c) = &h.client {
                    w.uint(3);
                    w.text(c);
                }
                if let Some(a) = &h.auth {
                    w.uint(4);
                    w.bytes(a);
                }
                if let Some(a) = &h.account {
                    w.uint(5);
                    w.bytes(a);
                }
            }
            Frame::Welcome(m) => {
                w.map(6 + m.relay.is_some() as usize);
                w.uint(0);
                w.uint(frame_type::WELCOME);
                w.uint(1);
                w.uint(m.version);
                w.uint(2);
                w.uint(m.features);
                w.uint(3);
                w.uint(m.max_frame);
                w.uint(4);
                w.bytes(&m.session);
                if let Some(r) = &m.relay {
                    w.uint(5);
                    w.text(r);
                }
                w.uint(6);
                w.uint(m.heartbeat_ms);
            }
            Frame::Sub(s) => {
                w.map(
                    6 + s.durable.is_some() as usize
                        + s.replay.is_some() as usize
                        + s.credit.is_some() as usize
                        + s.owner.is_some() as usize,
                );
                w.uint(0);
                w.uint(frame_type::SUB);
                w.uint(1);
                w.uint(s.sub_id);
                w.uint(2);
                w.bytes(s.pattern.key_id().as_bytes());
                w.uint(3);
                w.array(s.pattern.elems().len());
                for e in s.pattern.elems() {
                    match e {
                        PatternElem::Token(t) => w.bytes(t.as_bytes()),
                        PatternElem::One => w.uint(ELEM_ONE),
                        PatternElem::Rest => w.uint(ELEM_REST),
                    }
                }
                w.uint(4);
                w.uint(s.qos as u64);
                if let Some(d) = &s.durable {
                    w.uint(5);
                    w.text(d);
                }
                if let Some(r) = &s.replay {
                    w.uint(6);
                    w.array(2);
                    let (k, v) = match r {
                        Replay::FromSeq(v) => (REPLAY_FROM_SEQ, v),
                        Replay::SinceMs(v) => (REPLAY_SINCE_MS, v),
                        Replay::LastN(v) => (REPLAY_LAST_N, v),
                    };
                    w.uint(k);
                    w.uint(*v);
                }
                w.uint(7);
                w.bool(s.retained);
                if let Some(c) = s.credit {
                    w.uint(8);
                    w.uint(c);
                }
                if let Some(o) = &s.owner {
                    w.uint(9);
                    w.bytes(o);
                }
            }
            Frame::Unsub(u) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::UNSUB);
                w.uint(1);
                w.uint(u.sub_id);
            }
            Frame::SubOk(s) => {
                w.map(3);
                w.uint(0);
                w.uint(frame_type::SUB_OK);
                w.uint(1);
                w.uint(s.sub_id);
                w.uint(2);
                w.uint(s.seq);
            }
            Frame::Pub(p) => {
                w.map(4 + p.publish_id.is_some() as usize);
                w.uint(0);
                w.uint(frame_type::PUB);
                w.uint(1);
                w.bytes(p.envelope.as_bytes());
                w.uint(2);
                w.uint(p.flags);
                if let Some(id) = &p.publish_id {
                    w.uint(3);
                    w.bytes(id);
                }
                w.uint(4);
                w.uint(p.qos as u64);
            }
            Frame::Msg(m) => {
                w.map(4);
                w.uint(0);
                w.uint(frame_type::MSG);
                w.uint(1);
                w.uint(m.seq);
                w.uint(2);
                w.bytes(m.envelope.as_bytes());
                w.uint(3);
                w.uint(m.flags);
            }
            Frame::Ack(a) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::ACK);
                w.uint(1);
                w.array(a.seqs.len());
                a.seqs.iter().for_each(|s| w.uint(*s));
            }
            Frame::PubAck(p) => {
                w.map(3);
                w.uint(0);
                w.uint(frame_type::PUB_ACK);
                w.uint(1);
                w.bytes(&p.publish_id);
                w.uint(2);
                w.uint(p.seq);
            }
            Frame::Err(e) => {
                w.map(4 + e.sub_id.is_some() as usize + e.publish_id.is_some() as usize);
                w.uint(0);
                w.uint(frame_type::ERR);
                w.uint(1);
                w.uint(e.code.to_u16() as u64);
                w.uint(2);
                w.text(truncate_text(&e.message));
                w.uint(3);
                w.bool(e.fatal);
                if let Some(s) = e.sub_id {
                    w.uint(4);
                    w.uint(s);
                }
                if let Some(p) = &e.publish_id {
                    w.uint(5);
                    w.bytes(p);
                }
            }
            Frame::Ping(p) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::PING);
                w.uint(1);
                w.uint(p.nonce);
            }
            Frame::Pong(p) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::PONG);
                w.uint(1);
                w.uint(p.nonce);
            }
            Frame::Gap(g) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::GAP);
                w.uint(1);
                w.uint(g.dropped);
            }
            Frame::Close(c) => {
                w.map(3);
                w.uint(0);
                w.uint(frame_type::CLOSE);
                w.uint(1);
                w.uint(c.code.to_u16() as u64);
                w.uint(2);
                w.text(truncate_text(&c.message));
            }
            Frame::ReplayDone(d) => {
                w.map(4);
                w.uint(0);
                w.uint(frame_type::REPLAY_DONE);
                w.uint(1);
                w.uint(d.sub_id);
                w.uint(2);
                w.uint(d.seq);
                w.uint(3);
                w.uint(d.count);
            }
            Frame::Challenge(c) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::CHALLENGE);
                w.uint(1);
                w.bytes(&c.nonce);
            }
            Frame::Auth(a) => {
                w.map(2);
                w.uint(0);
                w.uint(frame_type::AUTH);
                w.uint(1);
                w.bytes(&a.sig);
            }
        }
    }

    /// Decodes one complete frame. Byte strings (the envelope) are shared with `input`, not
    /// copied. Trailing bytes are an error.
    pub fn decode(input: &Bytes) -> Result<Frame, DecodeError> {
        if input.len() > MAX_FRAME_CEILING {
            return Err(DecodeError::TooLarge {
                what: "frame",
                len: input.len(),
                max: MAX_FRAME_CEILING,
            });
        }
        let mut r = Reader::new(input);
        let n = r.map_len("frame", "frame")?;
        if n == 0 {
            return Err(DecodeError::MissingField {
                frame: "frame",
                field: "type",
            });
        }
        match r.uint("frame", "key")? {
            0 => {}
            _ => {
                return Err(DecodeError::InvalidField {
                    frame: "frame",
                    field: "type",
                    reason: "key 0 (frame type) must come first",
                })
            }
        }
        let ty = r.uint("frame", "type")?;
        let frame = decode_body(&mut r, ty, n - 1)?;
        let rest = r.remaining();
        if rest != 0 {
            return Err(DecodeError::TrailingBytes(rest));
        }
        Ok(frame)
    }

    /// Decodes from a borrowed slice (copies it once).
    pub fn decode_slice(input: &[u8]) -> Result<Frame, DecodeError> {
        Self::decode(&Bytes::copy_from_slice(input))
    }
}

fn truncate_text(s: &str) -> &str {
    if s.len() <= MAX_TEXT_LEN {
        return s;
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Walks the remaining `n` map entries, handing known keys to `field` (which returns false
/// for keys it does not know; those values are skipped). Duplicate keys are rejected.
fn fields(
    r: &mut Reader<'_>,
    n: usize,
    frame: &'static str,
    mut field: impl FnMut(&mut Reader<'_>, u64) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let mut seen: u64 = 1; // key 0 already read
    let mut seen_high: Vec<u64> = Vec::new(); // keys >= 64 (at most MAX_CBOR_ITEMS of them)
    for _ in 0..n {
        let key = r.uint(frame, "key")?;
        let dup = if key < 64 {
            let d = seen & (1 << key) != 0;
            seen |= 1 << key;
            d
        } else {
            let d = seen_high.contains(&key);
            seen_high.push(key);
            d
        };
        if dup {
            return Err(DecodeError::DuplicateField { frame, key });
        }
        if !field(r, key)? {
            r.skip(0)?;
        }
    }
    Ok(())
}

fn need<T>(v: Option<T>, frame: &'static str, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField { frame, field })
}

fn qos(r: &mut Reader<'_>, frame: &'static str) -> Result<Qos, DecodeError> {
    let v = r.uint(frame, "qos")?;
    Qos::from_u64(v).ok_or(DecodeError::InvalidField {
        frame,
        field: "qos",
        reason: "must be 0, 1 or 2",
    })
}

fn envelope(r: &mut Reader<'_>, frame: &'static str) -> Result<Envelope, DecodeError> {
    let b = r.bytes(frame, "envelope", MAX_FRAME_CEILING)?;
    Envelope::from_bytes(b)
}

fn decode_body(r: &mut Reader<'_>, ty: u64, n: usize) -> Result<Frame, DecodeError> {
    use frame_type as t;
    Ok(match ty {
        t::HELLO => {
            const F: &str = "Hello";
            let (mut versions, mut features, mut client, mut auth, mut account) =
                (None, None, None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => {
                        let len = r.array_len(F, "versions", MAX_OFFERED_VERSIONS)?;
                        let mut v = Vec::with_capacity(len);
                        for _ in 0..len {
                            v.push(r.uint(F, "versions")?);
                        }
                        versions = Some(v);
                    }
                    2 => features = Some(r.uint(F, "features")?),
                    3 => client = Some(r.text(F, "client", MAX_TEXT_LEN)?),
                    4 => auth = Some(r.bytes(F, "auth", MAX_AUTH_LEN)?),
                    5 => account = Some(r.bytes_n::<32>(F, "account")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            let versions = need(versions, F, "versions")?;
            if versions.is_empty() {
                return Err(DecodeError::InvalidField {
                    frame: F,
                    field: "versions",
                    reason: "must offer at least one version",
                });
            }
            Frame::Hello(Hello {
                versions,
                features: features.unwrap_or(0),
                client,
                auth,
                account,
            })
        }
        t::WELCOME => {
            const F: &str = "Welcome";
            let (mut version, mut feats, mut max_frame, mut session, mut relay, mut hb) =
                (None, None, None, None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => version = Some(r.uint(F, "version")?),
                    2 => feats = Some(r.uint(F, "features")?),
                    3 => max_frame = Some(r.uint(F, "max_frame")?),
                    4 => session = Some(r.bytes16(F, "session")?),
                    5 => relay = Some(r.text(F, "relay", MAX_TEXT_LEN)?),
                    6 => hb = Some(r.uint(F, "heartbeat_ms")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::Welcome(Welcome {
                version: need(version, F, "version")?,
                features: feats.unwrap_or(0),
                max_frame: need(max_frame, F, "max_frame")?,
                session: need(session, F, "session")?,
                relay,
                heartbeat_ms: hb.unwrap_or(0),
            })
        }
        t::SUB => {
            const F: &str = "Sub";
            let (mut sub_id, mut key_id, mut elems, mut q, mut durable, mut replay, mut retained) =
                (None, None, None, None, None, None, None);
            let (mut credit, mut owner) = (None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => sub_id = Some(r.uint(F, "sub_id")?),
                    2 => key_id = Some(KeyId::from_bytes(r.bytes16(F, "key_id")?)),
                    3 => {
                        let len = r.array_len(F, "filter", MAX_LEVELS)?;
                        let mut v = Vec::with_capacity(len);
                        for _ in 0..len {
                            v.push(match r.header()? {
                                ciborium_ll::Header::Positive(ELEM_ONE) => PatternElem::One,
                                ciborium_ll::Header::Positive(ELEM_REST) => PatternElem::Rest,
                                ciborium_ll::Header::Bytes(Some(TOKEN_LEN)) => {
                                    r_push_back_bytes16(r)?
                                }
                                _ => {
                                    return Err(DecodeError::InvalidField {
                                        frame: F,
                                        field: "filter",
                                        reason: "elements are 16-byte tokens, 1 (+) or 2 (#)",
                                    })
                                }
                            });
                        }
                        elems = Some(v);
                    }
                    4 => q = Some(qos(r, F)?),
                    5 => durable = Some(r.text(F, "durable", MAX_TEXT_LEN)?),
                    6 => {
                        if r.array_len(F, "replay", 2)? != 2 {
                            return Err(DecodeError::InvalidField {
                                frame: F,
                                field: "replay",
                                reason: "must be [kind, value]",
                            });
                        }
                        let kind = r.uint(F, "replay")?;
                        let v = r.uint(F, "replay")?;
                        replay = Some(match kind {
                            REPLAY_FROM_SEQ => Replay::FromSeq(v),
                            REPLAY_SINCE_MS => Replay::SinceMs(v),
                            REPLAY_LAST_N => Replay::LastN(v),
                            _ => {
                                return Err(DecodeError::InvalidField {
                                    frame: F,
                                    field: "replay",
                                    reason: "unknown replay kind",
                                })
                            }
                        });
                    }
                    7 => retained = Some(r.bool(F, "retained")?),
                    8 => credit = Some(r.uint(F, "credit")?),
                    9 => {
                        let o = r.bytes(F, "owner", *OWNER_LEN.end())?;
                        if !OWNER_LEN.contains(&o.len()) {
                            return Err(DecodeError::InvalidField {
                                frame: F,
                                field: "owner",
                                reason: "must be 16 to 64 bytes",
                            });
                        }
                        owner = Some(o);
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            let pattern = TokenPattern::new(need(key_id, F, "key_id")?, need(elems, F, "filter")?)?;
            Frame::Sub(Sub {
                sub_id: need(sub_id, F, "sub_id")?,
                pattern,
                qos: q.unwrap_or_default(),
                durable,
                replay,
                retained: retained.unwrap_or(true),
                credit,
                owner,
            })
        }
        t::UNSUB => {
            const F: &str = "Unsub";
            let mut sub_id = None;
            fields(r, n, F, |r, k| match k {
                1 => {
                    sub_id = Some(r.uint(F, "sub_id")?);
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Frame::Unsub(Unsub {
                sub_id: need(sub_id, F, "sub_id")?,
            })
        }
        t::SUB_OK => {
            const F: &str = "SubOk";
            let (mut sub_id, mut seq) = (None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => sub_id = Some(r.uint(F, "sub_id")?),
                    2 => seq = Some(r.uint(F, "seq")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::SubOk(SubOk {
                sub_id: need(sub_id, F, "sub_id")?,
                seq: seq.unwrap_or(0),
            })
        }
        t::PUB => {
            const F: &str = "Pub";
            let (mut env, mut flags, mut pid, mut q) = (None, None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => env = Some(envelope(r, F)?),
                    2 => flags = Some(r.uint(F, "flags")?),
                    3 => pid = Some(r.bytes16(F, "publish_id")?),
                    4 => q = Some(qos(r, F)?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            let flags = flags.unwrap_or(0);
            if flags & pub_flags::ACK != 0 && pid.is_none() {
                return Err(DecodeError::MissingField {
                    frame: F,
                    field: "publish_id",
                });
            }
            Frame::Pub(Pub {
                envelope: need(env, F, "envelope")?,
                flags,
                publish_id: pid,
                qos: q.unwrap_or_default(),
            })
        }
        t::MSG => {
            const F: &str = "Msg";
            let (mut seq, mut env, mut flags) = (None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => seq = Some(r.uint(F, "seq")?),
                    2 => env = Some(envelope(r, F)?),
                    3 => flags = Some(r.uint(F, "flags")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::Msg(Msg {
                seq: seq.unwrap_or(0),
                envelope: need(env, F, "envelope")?,
                flags: flags.unwrap_or(0),
            })
        }
        t::ACK => {
            const F: &str = "Ack";
            let mut seqs = None;
            fields(r, n, F, |r, k| match k {
                1 => {
                    let len = r.array_len(F, "seqs", MAX_ACKS_PER_FRAME)?;
                    let mut v = Vec::with_capacity(len);
                    for _ in 0..len {
                        v.push(r.uint(F, "seqs")?);
                    }
                    seqs = Some(v);
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Frame::Ack(Ack {
                seqs: need(seqs, F, "seqs")?,
            })
        }
        t::PUB_ACK => {
            const F: &str = "PubAck";
            let (mut pid, mut seq) = (None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => pid = Some(r.bytes16(F, "publish_id")?),
                    2 => seq = Some(r.uint(F, "seq")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::PubAck(PubAck {
                publish_id: need(pid, F, "publish_id")?,
                seq: seq.unwrap_or(0),
            })
        }
        t::ERR => {
            const F: &str = "Err";
            let (mut code, mut msg, mut fatal, mut sub_id, mut pid) =
                (None, None, None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => {
                        let c = r.uint(F, "code")?;
                        let c = u16::try_from(c).map_err(|_| DecodeError::InvalidField {
                            frame: F,
                            field: "code",
                            reason: "must fit in 16 bits",
                        })?;
                        code = Some(ErrorCode::from_u16(c));
                    }
                    2 => msg = Some(r.text(F, "message", MAX_TEXT_LEN)?),
                    3 => fatal = Some(r.bool(F, "fatal")?),
                    4 => sub_id = Some(r.uint(F, "sub_id")?),
                    5 => pid = Some(r.bytes16(F, "publish_id")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::Err(ErrFrame {
                code: need(code, F, "code")?,
                message: msg.unwrap_or_default(),
                fatal: fatal.unwrap_or(false),
                sub_id,
                publish_id: pid,
            })
        }
        t::PING | t::PONG | t::GAP => {
            let f = match ty {
                t::PING => "Ping",
                t::PONG => "Pong",
                _ => "Gap",
            };
            let mut v = None;
            fields(r, n, f, |r, k| match k {
                1 => {
                    v = Some(r.uint(f, "value")?);
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            let v = v.unwrap_or(0);
            match ty {
                t::PING => Frame::Ping(Ping { nonce: v }),
                t::PONG => Frame::Pong(Pong { nonce: v }),
                _ => Frame::Gap(Gap { dropped: v }),
            }
        }
        t::CLOSE => {
            const F: &str = "Close";
            let (mut code, mut msg) = (None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => {
                        let c = r.uint(F, "code")?;
                        let c = u16::try_from(c).map_err(|_| DecodeError::InvalidField {
                            frame: F,
                            field: "code",
                            reason: "must fit in 16 bits",
                        })?;
                        code = Some(ErrorCode::from_u16(c));
                    }
                    2 => msg = Some(r.text(F, "message", MAX_TEXT_LEN)?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::Close(Close {
                code: need(code, F, "code")?,
                message: msg.unwrap_or_default(),
            })
        }
        t::REPLAY_DONE => {
            const F: &str = "ReplayDone";
            let (mut sub_id, mut seq, mut count) = (None, None, None);
            fields(r, n, F, |r, k| {
                match k {
                    1 => sub_id = Some(r.uint(F, "sub_id")?),
                    2 => seq = Some(r.uint(F, "seq")?),
                    3 => count = Some(r.uint(F, "count")?),
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            Frame::ReplayDone(ReplayDone {
                sub_id: need(sub_id, F, "sub_id")?,
                seq: seq.unwrap_or(0),
                count: count.unwrap_or(0),
            })
        }
        t::CHALLENGE => {
            const F: &str = "Challenge";
            let mut nonce = None;
            fields(r, n, F, |r, k| match k {
                1 => {
                    nonce = Some(r.bytes_n::<32>(F, "nonce")?);
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Frame::Challenge(Challenge {
                nonce: need(nonce, F, "nonce")?,
            })
        }
        t::AUTH => {
            const F: &str = "Auth";
            let mut sig = None;
            fields(r, n, F, |r, k| match k {
                1 => {
                    sig = Some(r.bytes_n::<64>(F, "sig")?);
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            Frame::Auth(Auth {
                sig: need(sig, F, "sig")?,
            })
        }
        other => return Err(DecodeError::UnknownFrameType(other)),
    })
}

/// After a `Bytes(16)` header was pulled inside a filter, reads the 16 token bytes.
fn r_push_back_bytes16(r: &mut Reader<'_>) -> Result<PatternElem, DecodeError> {
    let b = r.raw(TOKEN_LEN)?;
    Ok(PatternElem::Token(TopicToken::from_slice(&b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_skipped_and_duplicates_rejected() {
        // {0: 11, 1: 5, 9: [1, "x", h'00']}
        let f = Bytes::from_static(&[
            0xa3, 0x00, 0x0b, 0x01, 0x05, 0x09, 0x83, 0x01, 0x61, b'x', 0x41, 0x00,
        ]);
        assert_eq!(Frame::decode(&f).unwrap(), Frame::Ping(Ping { nonce: 5 }));
        let dup = Bytes::from_static(&[0xa3, 0x00, 0x0b, 0x01, 0x05, 0x01, 0x06]);
        assert!(matches!(
            Frame::decode(&dup),
            Err(DecodeError::DuplicateField { key: 1, .. })
        ));
        let indefinite = Bytes::from_static(&[0xbf, 0x00, 0x0b, 0xff]);
        assert!(Frame::decode(&indefinite).is_err());
        let trailing = Bytes::from_static(&[0xa2, 0x00, 0x0b, 0x01, 0x05, 0x00]);
        assert_eq!(Frame::decode(&trailing), Err(DecodeError::TrailingBytes(1)));
        let unknown = Bytes::from_static(&[0xa1, 0x00, 0x18, 0x63]);
        assert_eq!(
            Frame::decode(&unknown),
            Err(DecodeError::UnknownFrameType(99))
        );
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        // Ack with an array declared to hold 2^32 items.
        let f = Bytes::from_static(&[0xa2, 0x00, 0x08, 0x01, 0x9a, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Frame::decode(&f),
            Err(DecodeError::TooLarge { .. })
        ));
        // Hello with a client name declared as 2^60 bytes.
        let f = Bytes::from_static(&[0xa2, 0x00, 0x01, 0x03, 0x7b, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Frame::decode(&f),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(&[2]), Some(2));
        assert_eq!(negotiate_version(&[7, 2, 3]), Some(2));
        assert_eq!(negotiate_version(&[1]), None, "version 1 is refused");
        assert_eq!(negotiate_version(&[1, 3]), None);
    }

    #[test]
    fn wave2_fields_round_trip() {
        let hello = Frame::Hello(Hello {
            versions: vec![2],
            features: 3,
            client: None,
            auth: Some(Bytes::from_static(b"token")),
            account: Some([7; 32]),
        });
        assert_eq!(Frame::decode(&hello.to_bytes()).unwrap(), hello);
        for f in [
            Frame::Challenge(Challenge { nonce: [1; 32] }),
            Frame::Auth(Auth { sig: [2; 64] }),
        ] {
            assert_eq!(Frame::decode(&f.to_bytes()).unwrap(), f);
        }
        // A 16-byte nonce is refused.
        let short = Bytes::from_static(&[
            0xa2, 0x00, 0x10, 0x01, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        assert!(Frame::decode(&short).is_err());
        for c in 18..=22u16 {
            assert_eq!(ErrorCode::from_u16(c).to_u16(), c);
            assert_ne!(ErrorCode::from_u16(c).name(), "other");
        }
        assert!(ErrorCode::Busy.is_retryable() && !ErrorCode::AuthFailed.is_retryable());
    }
}
