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

/// Context string of a relay-bound `Auth` signature (one naming the relay, `Auth.relay`).
pub const AUTH_BOUND_CONTEXT: &[u8] = b"whispeer/v2/relay-auth-bound\0";

/// The bytes a relay account signs in an `Auth` without `relay` (the legacy form):
/// `AUTH_CONTEXT ‖ nonce ‖ account`. Binding the account key keeps a signature from being
/// replayed under another account; the relay's fresh random nonce keeps it from being
/// replayed at all. Nothing in it names the relay: a relay the client signs in to can pass
/// another relay's nonce off as its own and sign in there as the client (PROTOCOL §10) —
/// [`auth_bound_sig_input`] closes that.
pub fn auth_sig_input(nonce: &[u8; 32], account: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_CONTEXT.len() + 64);
    m.extend_from_slice(AUTH_CONTEXT);
    m.extend_from_slice(nonce);
    m.extend_from_slice(account);
    m
}

/// The bytes a relay account signs in a relay-bound `Auth` (one carrying `relay`):
/// `AUTH_BOUND_CONTEXT ‖ nonce ‖ account ‖ u8 len ‖ relay`, `relay` being the relay's name
/// as the client dialed it ([`crate::relay_name`]). A relay that checks the name against its
/// own (`auth.names`) refuses a signature made for another relay, so a relay passing
/// another's challenge on gets nothing it can use there. `None` when `relay` is empty or
/// longer than [`relay_name::MAX_LEN`](crate::relay_name::MAX_LEN) bytes.
pub fn auth_bound_sig_input(nonce: &[u8; 32], account: &[u8; 32], relay: &str) -> Option<Vec<u8>> {
    let len = u8::try_from(relay.len()).ok().filter(|n| *n > 0)?;
    let mut m = Vec::with_capacity(AUTH_BOUND_CONTEXT.len() + 65 + relay.len());
    m.extend_from_slice(AUTH_BOUND_CONTEXT);
    m.extend_from_slice(nonce);
    m.extend_from_slice(account);
    m.push(len);
    m.extend_from_slice(relay.as_bytes());
    Some(m)
}

impl Auth {
    /// What the signature of this `Auth` covers, for the account `account` and the nonce
    /// of the relay's `Challenge`: [`auth_bound_sig_input`] over `relay` when present, else
    /// [`auth_sig_input`].
    pub fn sig_input(&self, nonce: &[u8; 32], account: &[u8; 32]) -> Vec<u8> {
        match &self.relay {
            // The decoder refuses an empty or over-long name; one built by hand that is
            // signs nothing anyone can verify (an empty input never matches a signature
            // made over a real one).
            Some(r) => auth_bound_sig_input(nonce, account, r).unwrap_or_default(),
            None => auth_sig_input(nonce, account),
        }
    }
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
    /// The relay deletes a durable subscription on `Unsub.delete` (a relay without it
    /// ignores the key: the durable would stay).
    pub const DURABLE_DELETE: u64 = 1 << 6;
    /// The relay ends a subscription's retained values with `ReplayDone` as it ends a
    /// replay, and says in `SubOk.history` when one follows: until then it holds back the
    /// subscription's live messages, so a client holds back those it gets for another
    /// subscription of the connection (live `Msg`s name none) and takes the relay's copy
    /// after `ReplayDone`, in order.
    pub const HISTORY_END: u64 = 1 << 7;
    /// Copies are addressed: the relay names the paused subscriptions a live copy for a
    /// neighbour matches (`Msg.paused`), and the subscription a catch-up copy (or a live
    /// message held back during its history) is for (`Msg.sub_id` with live flags). A
    /// client that does not ask gets neither (a named catch-up copy would reach only the
    /// named subscription, and such a client's dedup would drop another paused one's own
    /// copy later).
    pub const NAMED_COPIES: u64 = 1 << 8;
    /// A `Sub` asking for retained values *and* a replay from sequence `x`
    /// (`Replay::FromSeq`) gets both: the retained values older than `x`, then the history
    /// from `x`, in one hand-over ended by one `ReplayDone`. Without it a relay ignores
    /// `retained` next to a replay. What a client's resume needs when the connection ended
    /// during an at-least-once subscription's retained values: the messages stored since it
    /// was confirmed, and the retained values it had not had.
    pub const RETAINED_BEFORE: u64 = 1 << 9;
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

// ---------------------------------------------------------------------------------------
// The frame table. Every field of every frame is declared exactly once below — map key,
// Rust field, wire codec and presence — and both `encode` and `decode` are generated from
// that one declaration, so the two directions cannot drift apart (wave 1 had two
// hand-written matches). Presence:
// - `req`: required; always written; a missing key is `MissingField`.
// - `always(d)`: always written; a missing key decodes as `d`.
// - `opt`: an `Option`; written only when `Some`.
// Keys are declared in ascending order, which is the order the encoder writes them.
// ---------------------------------------------------------------------------------------

/// How one field's value travels as CBOR. A codec may span `WIDTH` consecutive map keys
/// (the `Sub` pattern is `key_id` at key 2 and `filter` at key 3).
trait Codec<V> {
    /// Consecutive map keys the value occupies.
    const WIDTH: u64 = 1;
    /// What decoding has gathered so far.
    type Partial: Default;
    /// Writes the map entries (keys from `key`, and values).
    fn write(v: &V, key: u64, w: &mut Writer<'_>);
    /// Reads the value of key `key + index`.
    fn read(
        p: &mut Self::Partial,
        index: u64,
        r: &mut Reader<'_>,
        frame: &'static str,
        field: &'static str,
    ) -> Result<(), DecodeError>;
    /// The value, `None` when its key was absent.
    fn finish(
        p: Self::Partial,
        frame: &'static str,
        field: &'static str,
    ) -> Result<Option<V>, DecodeError>;
}

/// A codec of one map entry: `read_one`/`write_one` are all it states.
macro_rules! single_codec {
    ($(#[$m:meta])* $codec:ident for $v:ty,
     write |$wv:ident, $w:ident| $write:expr,
     read |$r:ident, $f:ident, $n:ident| $read:expr) => {
        $(#[$m])*
        struct $codec;
        impl Codec<$v> for $codec {
            type Partial = Option<$v>;
            fn write($wv: &$v, key: u64, $w: &mut Writer<'_>) {
                $w.uint(key);
                $write;
            }
            fn read(
                p: &mut Option<$v>,
                _index: u64,
                $r: &mut Reader<'_>,
                $f: &'static str,
                $n: &'static str,
            ) -> Result<(), DecodeError> {
                *p = Some($read);
                Ok(())
            }
            fn finish(
                p: Option<$v>,
                _: &'static str,
                _: &'static str,
            ) -> Result<Option<$v>, DecodeError> {
                Ok(p)
            }
        }
    };
}

single_codec!(
    /// An unsigned integer.
    Uint for u64, write |v, w| w.uint(*v), read |r, f, n| r.uint(f, n)?);
single_codec!(
    /// `true`/`false`.
    Flag for bool, write |v, w| w.bool(*v), read |r, f, n| r.bool(f, n)?);
single_codec!(
    /// Text of at most `MAX_TEXT_LEN` bytes, written as is (names must not be cut).
    Text for String, write |v, w| w.text(v), read |r, f, n| r.text(f, n, MAX_TEXT_LEN)?);
single_codec!(
    /// Human-readable text, cut at `MAX_TEXT_LEN` bytes (on a character boundary) when written.
    Message for String, write |v, w| w.text(truncate_text(v)), read |r, f, n| r.text(f, n, MAX_TEXT_LEN)?);
single_codec!(
    /// A relay name: text of at most `relay_name::MAX_LEN` bytes (refused above it before
    /// anything is allocated).
    RelayName for String, write |v, w| w.text(v),
    read |r, f, n| r.text(f, n, crate::relay_name::MAX_LEN)?);
single_codec!(
    /// A byte string, shared with the input (per-field limits are checked by the frame).
    Blob for Bytes, write |v, w| w.bytes(v), read |r, f, n| r.bytes(f, n, MAX_FRAME_CEILING)?);
single_codec!(
    /// Exactly 16 bytes.
    B16 for [u8; 16], write |v, w| w.bytes(v), read |r, f, n| r.bytes_n::<16>(f, n)?);
single_codec!(
    /// Exactly 32 bytes.
    B32 for [u8; 32], write |v, w| w.bytes(v), read |r, f, n| r.bytes_n::<32>(f, n)?);
single_codec!(
    /// Exactly 64 bytes.
    B64 for [u8; 64], write |v, w| w.bytes(v), read |r, f, n| r.bytes_n::<64>(f, n)?);
single_codec!(
/// An array of unsigned integers (at most `MAX_ACKS_PER_FRAME`; frames may cap lower).
Uints for Vec<u64>,
write |v, w| { w.array(v.len()); v.iter().for_each(|x| w.uint(*x)) },
read |r, f, n| {
    let len = r.array_len(f, n, MAX_ACKS_PER_FRAME)?;
    // Each item takes at least a byte: a few bytes claiming 4,096 items reserve no more
    // than the input could hold (32 KiB before, for a 7-byte Hello before the handshake).
    let mut v = Vec::with_capacity(len.min(r.remaining()));
    for _ in 0..len {
        v.push(r.uint(f, n)?);
    }
    v
});
single_codec!(
/// QoS 0, 1 or 2.
QosCodec for Qos, write |v, w| w.uint(*v as u64), read |r, f, n| {
    Qos::from_u64(r.uint(f, n)?).ok_or(DecodeError::InvalidField {
        frame: f,
        field: n,
        reason: "must be 0, 1 or 2",
    })?
});
single_codec!(
/// `[kind, value]` (§3.4.3).
ReplayCodec for Replay,
write |v, w| {
    let (k, x) = match v {
        Replay::FromSeq(x) => (REPLAY_FROM_SEQ, x),
        Replay::SinceMs(x) => (REPLAY_SINCE_MS, x),
        Replay::LastN(x) => (REPLAY_LAST_N, x),
    };
    w.array(2);
    w.uint(k);
    w.uint(*x);
},
read |r, f, n| {
    if r.array_len(f, n, 2)? != 2 {
        return Err(DecodeError::InvalidField { frame: f, field: n, reason: "must be [kind, value]" });
    }
    let kind = r.uint(f, n)?;
    let v = r.uint(f, n)?;
    match kind {
        REPLAY_FROM_SEQ => Replay::FromSeq(v),
        REPLAY_SINCE_MS => Replay::SinceMs(v),
        REPLAY_LAST_N => Replay::LastN(v),
        _ => return Err(DecodeError::InvalidField { frame: f, field: n, reason: "unknown replay kind" }),
    }
});
single_codec!(
    /// An envelope (validated as §4.2 says), shared with the input.
    EnvelopeCodec for Envelope, write |v, w| w.bytes(v.as_bytes()),
    read |r, f, n| Envelope::from_bytes(r.bytes(f, n, MAX_FRAME_CEILING)?)?);
single_codec!(
/// An error code (16 bits).
CodeCodec for ErrorCode, write |v, w| w.uint(v.to_u16() as u64), read |r, f, n| {
    let c = r.uint(f, n)?;
    ErrorCode::from_u16(u16::try_from(c).map_err(|_| DecodeError::InvalidField {
        frame: f,
        field: n,
        reason: "must fit in 16 bits",
    })?)
});

/// A token pattern: `key_id` (16 bytes) at the first key, the filter array at the next.
struct PatternCodec;
impl Codec<TokenPattern> for PatternCodec {
    const WIDTH: u64 = 2;
    type Partial = (Option<KeyId>, Option<Vec<PatternElem>>);
    fn write(v: &TokenPattern, key: u64, w: &mut Writer<'_>) {
        w.uint(key);
        w.bytes(v.key_id().as_bytes());
        w.uint(key + 1);
        w.array(v.elems().len());
        for e in v.elems() {
            match e {
                PatternElem::Token(t) => w.bytes(t.as_bytes()),
                PatternElem::One => w.uint(ELEM_ONE),
                PatternElem::Rest => w.uint(ELEM_REST),
            }
        }
    }
    fn read(
        p: &mut Self::Partial,
        index: u64,
        r: &mut Reader<'_>,
        f: &'static str,
        _: &'static str,
    ) -> Result<(), DecodeError> {
        if index == 0 {
            p.0 = Some(KeyId::from_bytes(r.bytes16(f, "key_id")?));
            return Ok(());
        }
        let len = r.array_len(f, "filter", MAX_LEVELS)?;
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            v.push(match r.header()? {
                ciborium_ll::Header::Positive(ELEM_ONE) => PatternElem::One,
                ciborium_ll::Header::Positive(ELEM_REST) => PatternElem::Rest,
                ciborium_ll::Header::Bytes(Some(TOKEN_LEN)) => {
                    PatternElem::Token(TopicToken::from_slice(&r.raw(TOKEN_LEN)?)?)
                }
                _ => {
                    return Err(DecodeError::InvalidField {
                        frame: f,
                        field: "filter",
                        reason: "elements are 16-byte tokens, 1 (+) or 2 (#)",
                    })
                }
            });
        }
        p.1 = Some(v);
        Ok(())
    }
    fn finish(
        p: Self::Partial,
        f: &'static str,
        _: &'static str,
    ) -> Result<Option<TokenPattern>, DecodeError> {
        match p {
            (None, None) => Ok(None),
            (Some(k), Some(e)) => Ok(Some(TokenPattern::new(k, e)?)),
            (None, Some(_)) => Err(DecodeError::MissingField {
                frame: f,
                field: "key_id",
            }),
            (Some(_), None) => Err(DecodeError::MissingField {
                frame: f,
                field: "filter",
            }),
        }
    }
}

/// One frame's body: encoded and decoded from its field table.
trait Body: Sized {
    const TYPE: u64;
    /// Map entries written after key 0.
    fn entries(&self) -> usize;
    fn write_fields(&self, w: &mut Writer<'_>);
    fn read_fields(r: &mut Reader<'_>, n: usize) -> Result<Self, DecodeError>;
}

macro_rules! field_ty {
    (opt, $t:ty) => { Option<$t> };
    ($mode:ident, $t:ty) => { $t };
}

macro_rules! field_entries {
    (opt, $c:ty, $t:ty, $v:expr) => {
        if $v.is_some() {
            <$c as Codec<$t>>::WIDTH as usize
        } else {
            0
        }
    };
    ($mode:ident, $c:ty, $t:ty, $v:expr) => {
        <$c as Codec<$t>>::WIDTH as usize
    };
}

macro_rules! field_write {
    (opt, $c:ty, $t:ty, $key:expr, $v:expr, $w:expr) => {
        if let Some(v) = $v {
            <$c as Codec<$t>>::write(v, $key, $w);
        }
    };
    ($mode:ident, $c:ty, $t:ty, $key:expr, $v:expr, $w:expr) => {
        <$c as Codec<$t>>::write($v, $key, $w)
    };
}

macro_rules! field_finish {
    (opt, $c:ty, $t:ty, $p:expr, $f:expr, $n:expr) => {
        <$c as Codec<$t>>::finish($p, $f, $n)?
    };
    (req, $c:ty, $t:ty, $p:expr, $f:expr, $n:expr) => {
        <$c as Codec<$t>>::finish($p, $f, $n)?.ok_or(DecodeError::MissingField {
            frame: $f,
            field: $n,
        })?
    };
    (always($d:expr), $c:ty, $t:ty, $p:expr, $f:expr, $n:expr) => {
        <$c as Codec<$t>>::finish($p, $f, $n)?.unwrap_or($d)
    };
}

/// The name a frame goes by in errors: its struct name unless given.
macro_rules! frame_label {
    ($name:ident) => {
        stringify!($name)
    };
    ($name:ident, $label:literal) => {
        $label
    };
}

/// Declares frame structs and generates their encoders and decoders from one field table.
macro_rules! frames {
    ($(
        $(#[$sm:meta])*
        $ty_const:ident => pub struct $name:ident $(= $label:literal)? $(check $check:ident)? {
            $(
                $(#[$fm:meta])*
                $key:literal => $field:ident: $t:ty as $codec:ty [$mode:ident $(($d:expr))?],
            )*
        }
    )*) => {
        $(
            $(#[$sm])*
            pub struct $name {
                $( $(#[$fm])* pub $field: field_ty!($mode, $t), )*
            }

            impl Body for $name {
                const TYPE: u64 = frame_type::$ty_const;
                #[allow(unused_variables)]
                fn entries(&self) -> usize {
                    0 $( + field_entries!($mode, $codec, $t, &self.$field) )*
                }
                #[allow(unused_variables)]
                fn write_fields(&self, w: &mut Writer<'_>) {
                    $( field_write!($mode, $codec, $t, $key, &self.$field, w); )*
                }
                #[allow(unused_mut, unused_variables)]
                fn read_fields(r: &mut Reader<'_>, n: usize) -> Result<Self, DecodeError> {
                    const F: &str = frame_label!($name $(, $label)?);
                    $( let mut $field = <<$codec as Codec<$t>>::Partial>::default(); )*
                    fields(r, n, F, |r, k| {
                        $(
                            if (k as u128) >= $key
                                && (k as u128) < $key + <$codec as Codec<$t>>::WIDTH as u128
                            {
                                <$codec as Codec<$t>>::read(&mut $field, k - $key, r, F, stringify!($field))?;
                                return Ok(true);
                            }
                        )*
                        Ok(false)
                    })?;
                    let v = $name {
                        $( $field: field_finish!($mode $(($d))?, $codec, $t, $field, F, stringify!($field)), )*
                    };
                    $( $check(&v)?; )?
                    Ok(v)
                }
            }
        )*

        #[cfg(test)]
        /// Every frame's declared keys, in declaration order (the tests check they ascend).
        const DECLARED_KEYS: &[(&str, &[(u64, u64)])] = &[
            $( (stringify!($name), &[ $( ($key, <$codec as Codec<$t>>::WIDTH) ),* ]), )*
        ];
    };
}

frames! {
    /// Client → relay, first frame: the versions and features the client speaks.
    #[derive(Debug, Clone, PartialEq, Eq)]
    HELLO => pub struct Hello check check_hello {
        /// Offered protocol versions (1..=8 of them).
        1 => versions: Vec<u64> as Uints [req],
        /// Feature bits the client wants ([`features`]).
        2 => features: u64 as Uint [always(0)],
        /// Optional client software name, for logs.
        3 => client: String as Text [opt],
        /// Optional bearer token of a relay account (services). Never the message-signing
        /// identity.
        4 => auth: Bytes as Blob [opt],
        /// Optional Ed25519 public key of a relay account: the relay answers with `Challenge`
        /// and the client proves the key with `Auth`. A key of its own, never the identity
        /// that signs messages (that would link senders to connections).
        5 => account: [u8; 32] as B32 [opt],
    }

    /// Relay → client, answer to `Hello`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    WELCOME => pub struct Welcome {
        /// The chosen version.
        1 => version: u64 as Uint [req],
        /// Feature bits the relay grants.
        2 => features: u64 as Uint [always(0)],
        /// Largest frame the relay accepts.
        3 => max_frame: u64 as Uint [req],
        /// A random session id (scopes publish-id dedup).
        4 => session: [u8; 16] as B16 [req],
        /// Optional relay software name.
        5 => relay: String as Text [opt],
        /// Interval at which the client should send `Ping` if otherwise idle (0 = none).
        6 => heartbeat_ms: u64 as Uint [always(0)],
        /// The relay's sequence space: 16 bytes naming the numbering its `Msg.seq`,
        /// `SubOk.seq` and `Replay::FromSeq` positions belong to (one per store, shared by
        /// every relay of a cluster). A client resumes by sequence only on a relay that
        /// names the space its positions came from (PROTOCOL §3.5.7).
        7 => seq_space: [u8; 16] as B16 [opt],
    }

    /// Client → relay: subscribe to a token pattern.
    #[derive(Debug, Clone, PartialEq, Eq)]
    SUB => pub struct Sub check check_sub {
        /// Client-chosen id, unique per connection.
        1 => sub_id: u64 as Uint [req],
        /// The compiled filter (`key_id` at key 2, the filter elements at key 3).
        2 => pattern: TokenPattern as PatternCodec [req],
        /// Delivery guarantee wanted.
        4 => qos: Qos as QosCodec [always(Qos::AtMostOnce)],
        /// Name of a durable subscription to resume.
        5 => durable: String as Text [opt],
        /// Where to start in history.
        6 => replay: Replay as ReplayCodec [opt],
        /// Deliver retained values of matching paths first (default true).
        7 => retained: bool as Flag [always(true)],
        /// For QoS ≥ 1: most unacknowledged messages in flight on this subscription (like
        /// JetStream's MaxAckPending). `None`: the relay's default. The relay keeps the rest in
        /// its store and sends them as acks free credit.
        8 => credit: u64 as Uint [opt],
        /// Owner secret of a durable subscription (16–64 bytes) when the connection has no
        /// relay account: only a `Sub` with the same secret may resume, ack or replace it.
        9 => owner: Bytes as Blob [opt],
    }

    /// Client → relay: drop a subscription.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    UNSUB => pub struct Unsub {
        /// The id given in `Sub`.
        1 => sub_id: u64 as Uint [req],
        /// `Some(true)`: the subscription is durable and its durable is deleted too (name,
        /// position, owner; relays granting [`features::DURABLE_DELETE`]). Absent or false:
        /// the durable is kept.
        2 => delete: bool as Flag [opt],
    }

    /// Relay → client: a subscription is active (live messages after this frame match it).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    SUB_OK => pub struct SubOk {
        /// The id given in `Sub`.
        1 => sub_id: u64 as Uint [req],
        /// The relay's last assigned sequence when the subscription became live (0 if none).
        2 => seq: u64 as Uint [always(0)],
        /// `Some(true)` (relays granting [`features::HISTORY_END`]): history (replayed or
        /// retained messages) follows, ended by `ReplayDone`; the relay holds back this
        /// subscription's live messages until then and sends them after it.
        3 => history: bool as Flag [opt],
    }

    /// Client → relay: publish an envelope. The relay reads the route from the envelope header.
    #[derive(Debug, Clone, PartialEq, Eq)]
    PUB => pub struct Pub check check_pub {
        /// The sealed envelope.
        1 => envelope: Envelope as EnvelopeCodec [req],
        /// [`pub_flags`] bits.
        2 => flags: u64 as Uint [always(0)],
        /// Random 128-bit id for `PubAck` and relay-side dedup (required with `ACK`).
        3 => publish_id: [u8; 16] as B16 [opt],
        /// Delivery guarantee wanted.
        4 => qos: Qos as QosCodec [always(Qos::AtMostOnce)],
    }

    /// Relay → client: a message. A live one carries nothing specific to one subscriber, so
    /// the relay encodes it once for all; the client matches the envelope's tokens to its
    /// own filters.
    #[derive(Debug, Clone, PartialEq, Eq)]
    MSG => pub struct Msg {
        /// Relay sequence (strictly increasing per relay store; 0 when not stored).
        1 => seq: u64 as Uint [always(0)],
        /// The envelope exactly as published.
        2 => envelope: Envelope as EnvelopeCodec [req],
        /// [`msg_flags`] bits.
        3 => flags: u64 as Uint [always(0)],
        /// History only (`REPLAYED` or `RETAINED`): the subscription whose history this is.
        /// History is per subscription, so without it a client with several subscriptions
        /// matching the envelope could not tell whose it is; live messages leave it out.
        4 => sub_id: u64 as Uint [opt],
        /// Live only: this connection's subscriptions the message matches that the relay
        /// did not send it to — their delivery is paused (credit, PROTOCOL §3.3.3 key 8):
        /// this copy is for the others, theirs follows in their catch-up, in sequence
        /// order (or is counted in the `Gap` naming them). Absent nearly always.
        5 => paused: Vec<u64> as Uints [opt],
    }

    /// Client → relay: acknowledge delivered sequences (QoS ≥ 1).
    #[derive(Debug, Clone, PartialEq, Eq)]
    ACK => pub struct Ack {
        /// Acknowledged relay sequences (at most [`MAX_ACKS_PER_FRAME`]).
        1 => seqs: Vec<u64> as Uints [req],
    }

    /// Relay → client: a publish was accepted (and stored, for QoS ≥ 1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    PUB_ACK => pub struct PubAck {
        /// The publish id from `Pub`.
        1 => publish_id: [u8; 16] as B16 [req],
        /// The relay sequence assigned (0 when not stored).
        2 => seq: u64 as Uint [always(0)],
    }

    /// Either side: an error. `fatal` means the sender closes the connection after it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    ERR => pub struct ErrFrame = "Err" {
        /// What went wrong.
        1 => code: ErrorCode as CodeCodec [req],
        /// Human-readable detail (never envelope bytes).
        2 => message: String as Message [always(String::new())],
        /// Whether the connection is closed after this frame.
        3 => fatal: bool as Flag [always(false)],
        /// The subscription concerned, if any.
        4 => sub_id: u64 as Uint [opt],
        /// The publish concerned, if any.
        5 => publish_id: [u8; 16] as B16 [opt],
    }

    /// Liveness probe; answered with `Pong` carrying the same nonce.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    PING => pub struct Ping {
        /// Echoed in the `Pong`.
        1 => nonce: u64 as Uint [always(0)],
    }

    /// Answer to `Ping`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    PONG => pub struct Pong {
        /// The `Ping`'s nonce.
        1 => nonce: u64 as Uint [always(0)],
    }

    /// Relay → client: messages were dropped for this connection (slow-consumer policy), or,
    /// naming a subscription, that subscription lost messages while it was paused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    GAP => pub struct Gap {
        /// How many messages were dropped since the last `Gap` (of its kind: for the
        /// connection, or for the subscription `sub_id` names).
        1 => dropped: u64 as Uint [always(0)],
        /// The subscription that lost them: skipped while it was paused (for credit, or over
        /// the relay-wide unacknowledged-bytes budget) and not kept by the store. Absent: a
        /// count for the connection as a whole.
        2 => sub_id: u64 as Uint [opt],
    }

    /// Either side: orderly close (e.g. the relay is shutting down).
    #[derive(Debug, Clone, PartialEq, Eq)]
    CLOSE => pub struct Close {
        /// Reason, as an error code.
        1 => code: ErrorCode as CodeCodec [req],
        /// Human-readable detail.
        2 => message: String as Message [always(String::new())],
    }

    /// Relay → client: the history of a replaying (or resumed durable) subscription has been
    /// sent; every later `Msg` for it is live. Sent only to clients granted [`features::REPLAY`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    REPLAY_DONE => pub struct ReplayDone {
        /// The id given in `Sub`.
        1 => sub_id: u64 as Uint [req],
        /// The boundary: history covered sequences up to and including this one (the `SubOk` seq).
        2 => seq: u64 as Uint [always(0)],
        /// How many history messages were sent.
        3 => count: u64 as Uint [always(0)],
    }

    /// Relay → client, answer to a `Hello` naming an account: sign this nonce.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    CHALLENGE => pub struct Challenge {
        /// 32 fresh random bytes.
        1 => nonce: [u8; 32] as B32 [req],
        /// `Some(true)`: the relay checks relay-bound signatures against its names
        /// (`auth.names`) and refuses an `Auth` without `relay`. Absent (or false): it
        /// takes either form.
        2 => bound: bool as Flag [opt],
    }

    /// Client → relay, answer to `Challenge`: Ed25519 signature by the account key over
    /// [`Auth::sig_input`]. The relay then sends `Welcome` or a fatal `Err(AuthFailed)`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    AUTH => pub struct Auth check check_auth {
        /// The signature (64 bytes).
        1 => sig: [u8; 64] as B64 [req],
        /// The relay's name as the client dialed it (`host:port`, [`crate::relay_name`]),
        /// 1 to 255 bytes: present, the signature is relay-bound
        /// ([`auth_bound_sig_input`]); absent, it is the legacy form ([`auth_sig_input`]).
        2 => relay: String as RelayName [opt],
    }
}

// Rules across fields or tighter than a codec's, applied after a frame's fields are read.

fn check_hello(h: &Hello) -> Result<(), DecodeError> {
    if h.versions.is_empty() {
        return Err(DecodeError::InvalidField {
            frame: "Hello",
            field: "versions",
            reason: "must offer at least one version",
        });
    }
    if h.versions.len() > MAX_OFFERED_VERSIONS {
        return Err(DecodeError::TooLarge {
            what: "versions",
            len: h.versions.len(),
            max: MAX_OFFERED_VERSIONS,
            unit: "elements",
        });
    }
    if let Some(a) = &h.auth {
        if a.len() > MAX_AUTH_LEN {
            return Err(DecodeError::TooLarge {
                what: "auth",
                len: a.len(),
                max: MAX_AUTH_LEN,
                unit: "bytes",
            });
        }
    }
    Ok(())
}

fn check_auth(a: &Auth) -> Result<(), DecodeError> {
    if a.relay.as_deref() == Some("") {
        return Err(DecodeError::InvalidField {
            frame: "Auth",
            field: "relay",
            reason: "must be 1 to 255 bytes",
        });
    }
    Ok(())
}

impl Sub {
    /// A live QoS 0 subscription: no history, retained values, durable name or credit.
    pub fn live(sub_id: u64, pattern: TokenPattern) -> Self {
        Sub {
            sub_id,
            pattern,
            qos: Qos::AtMostOnce,
            durable: None,
            replay: None,
            retained: false,
            credit: None,
            owner: None,
        }
    }
}

fn check_sub(s: &Sub) -> Result<(), DecodeError> {
    match &s.owner {
        Some(o) if !OWNER_LEN.contains(&o.len()) => Err(DecodeError::InvalidField {
            frame: "Sub",
            field: "owner",
            reason: "must be 16 to 64 bytes",
        }),
        _ => Ok(()),
    }
}

fn check_pub(p: &Pub) -> Result<(), DecodeError> {
    if p.flags & pub_flags::ACK != 0 && p.publish_id.is_none() {
        return Err(DecodeError::MissingField {
            frame: "Pub",
            field: "publish_id",
        });
    }
    Ok(())
}

/// Flag bits of a `Pub` frame.
pub mod pub_flags {
    /// Keep this envelope as the retained value of its exact token path.
    pub const RETAIN: u64 = 1 << 0;
    /// Answer with `PubAck` once the message is accepted (stored for QoS ≥ 1).
    pub const ACK: u64 = 1 << 1;
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

/// Declares the `Frame` enum over the frame structs, with its dispatch.
macro_rules! frame_enum {
    ($($variant:ident($body:ident)),* $(,)?) => {
        /// Every frame of protocol version 2.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Frame {
            $( #[allow(missing_docs)] $variant($body), )*
        }

        impl Frame {
            /// The frame's type name, for logs and errors.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Frame::$variant(_) => stringify!($variant), )*
                }
            }

            /// Appends the CBOR encoding of the frame to `out`.
            pub fn encode(&self, out: &mut Vec<u8>) {
                let mut w = Writer::new(out);
                match self {
                    $( Frame::$variant(b) => write_body(b, &mut w), )*
                }
            }
        }

        fn decode_body(r: &mut Reader<'_>, ty: u64, n: usize) -> Result<Frame, DecodeError> {
            $(
                if ty == <$body as Body>::TYPE {
                    return Ok(Frame::$variant(<$body as Body>::read_fields(r, n)?));
                }
            )*
            Err(DecodeError::UnknownFrameType(ty))
        }
    };
}

frame_enum! {
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

fn write_body<B: Body>(b: &B, w: &mut Writer<'_>) {
    w.map(1 + b.entries());
    w.uint(0);
    w.uint(B::TYPE);
    b.write_fields(w);
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
    /// Encodes the frame (without transport framing) into a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.size_hint());
        self.encode(&mut out);
        Bytes::from(out)
    }

    /// Room for the encoded frame, so encoding an envelope copies it once (no regrowth).
    pub(crate) fn size_hint(&self) -> usize {
        match self {
            Frame::Pub(p) => p.envelope.len() + 64,
            Frame::Msg(m) => m.envelope.len() + 48,
            _ => 64,
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
                unit: "bytes",
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
    fn declared_keys_ascend_without_overlap() {
        for (frame, keys) in DECLARED_KEYS {
            let mut next = 1; // key 0 is the frame type
            for (key, width) in keys.iter() {
                assert!(
                    *key >= next,
                    "{frame}: key {key} out of order or overlapping"
                );
                next = key + width;
            }
        }
        assert_eq!(DECLARED_KEYS.len(), 17, "one table entry per frame type");
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
            Frame::Challenge(Challenge {
                nonce: [1; 32],
                bound: None,
            }),
            Frame::Auth(Auth {
                sig: [2; 64],
                relay: None,
            }),
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

    /// `Challenge.bound` and `Auth.relay` (key 2 each) are written only when set, so the
    /// legacy frames encode as before; an old client skips `bound` (an unknown key), and
    /// the relay name is 1 to 255 bytes, refused above that before it is read.
    #[test]
    fn relay_binding_keys() {
        let legacy = Frame::Challenge(Challenge {
            nonce: [1; 32],
            bound: None,
        });
        let mut want = vec![0xa2, 0x00, 0x10, 0x01, 0x58, 0x20];
        want.extend([1; 32]);
        assert_eq!(&legacy.to_bytes()[..], &want[..]);
        let bound = Frame::Challenge(Challenge {
            nonce: [1; 32],
            bound: Some(true),
        });
        want[0] = 0xa3;
        want.extend([0x02, 0xf5]);
        assert_eq!(&bound.to_bytes()[..], &want[..]);
        assert_eq!(Frame::decode(&bound.to_bytes()).unwrap(), bound);

        let auth = |relay: Option<&str>| {
            Frame::Auth(Auth {
                sig: [2; 64],
                relay: relay.map(str::to_owned),
            })
        };
        let legacy = auth(None).to_bytes();
        assert_eq!(legacy.len(), 70);
        assert_eq!(&legacy[..6], [0xa2, 0x00, 0x11, 0x01, 0x58, 0x40]);
        let named = auth(Some("relay.example.com:443")).to_bytes();
        assert_eq!(&named[..1], [0xa3]);
        assert_eq!(&named[70..72], [0x02, 0x75]);
        assert_eq!(&named[72..], b"relay.example.com:443");
        assert_eq!(
            Frame::decode(&named).unwrap(),
            auth(Some("relay.example.com:443"))
        );
        let longest = "a".repeat(255);
        let f = auth(Some(&longest)).to_bytes();
        assert_eq!(f.len(), 328, "the largest Auth");
        assert_eq!(Frame::decode(&f).unwrap(), auth(Some(&longest)));
        for bad in ["a".repeat(256), String::new()] {
            let b = auth(Some(&bad)).to_bytes();
            assert!(Frame::decode(&b).is_err(), "{} bytes", bad.len());
        }

        // The signature inputs: distinct contexts, the name's length before it.
        let (n, a) = ([7; 32], [8; 32]);
        let l = auth_sig_input(&n, &a);
        let b = auth_bound_sig_input(&n, &a, "h:1").unwrap();
        assert_eq!(&l[..23], b"whispeer/v2/relay-auth\0");
        assert_eq!(&b[..29], b"whispeer/v2/relay-auth-bound\0");
        assert_eq!(&b[29..93], &l[23..87]);
        assert_eq!(&b[93..], b"\x03h:1");
        assert_eq!(auth_bound_sig_input(&n, &a, ""), None);
        assert_eq!(auth_bound_sig_input(&n, &a, &"a".repeat(256)), None);
        assert_eq!(
            auth_bound_sig_input(&n, &a, &longest).map(|m| m.len()),
            Some(29 + 64 + 1 + 255)
        );
        let Frame::Auth(x) = auth(Some("h:1")) else {
            unreachable!()
        };
        assert_eq!(x.sig_input(&n, &a), b);
        let Frame::Auth(x) = auth(None) else {
            unreachable!()
        };
        assert_eq!(x.sig_input(&n, &a), l);
    }

    /// `Unsub.delete` (key 2) is written only when set, so an `Unsub` without it encodes
    /// as before; the bytes are PROTOCOL §3.3.4's example.
    #[test]
    fn unsub_delete_is_an_optional_key_2() {
        let del = Frame::Unsub(Unsub {
            sub_id: 7,
            delete: Some(true),
        });
        assert_eq!(
            &del.to_bytes()[..],
            [0xa3, 0x00, 0x04, 0x01, 0x07, 0x02, 0xf5]
        );
        assert_eq!(Frame::decode(&del.to_bytes()).unwrap(), del);
        let plain = Frame::Unsub(Unsub {
            sub_id: 7,
            delete: None,
        });
        assert_eq!(&plain.to_bytes()[..], [0xa2, 0x00, 0x04, 0x01, 0x07]);
        assert_eq!(features::DURABLE_DELETE, 0x40);
    }
}
