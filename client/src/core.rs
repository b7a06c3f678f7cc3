//! The runtime-free client core: everything about messages that does not touch a socket or a
//! clock. The tokio client and the WebAssembly client both drive this same code with their
//! own transport and timer (DESIGN §7), so nothing about messages is written twice.
//!
//! It holds the subscriptions and their filters, compiles filters to token patterns for
//! every accepted epoch, opens delivered envelopes once and hands them to every local
//! subscription whose filter matches, drops duplicates, and counts rejections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rand_core::CryptoRngCore;
use whispeer_protocol::frame::{self, Hello, Msg, Pub, Sub, Unsub};
use whispeer_protocol::{
    Frame, Identity, Keyring, MessageId, Opener, Outgoing, Qos, SealOptions, Sealer, SenderId,
    Topic, TopicFilter, TreeId,
};

use crate::error::{PublishError, SubscribeError};

/// Content type of typed (serde → CBOR) messages.
pub const CBOR: &str = "application/cbor";
/// Content type of raw byte messages.
pub const OCTETS: &str = "application/octet-stream";

/// A local subscription id (one per `subscribe` call).
pub type LocalSubId = u64;

/// A delivered, opened, verified message before it is decoded into the subscriber's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The topic.
    pub topic: Topic,
    /// The verified sender (`None` for unsigned messages).
    pub sender: Option<SenderId>,
    /// The sender's message id.
    pub msg_id: MessageId,
    /// The sender's timestamp (Unix ms).
    pub ts_ms: u64,
    /// The relay sequence (0 for live messages the relay did not store).
    pub seq: u64,
    /// The content type.
    pub content_type: String,
    /// The payload (decompressed).
    pub payload: Bytes,
    /// Whether the relay delivered it as a retained value.
    pub retained: bool,
}

/// Counters a client keeps (and exposes as metrics).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CoreStats {
    /// Messages opened and delivered.
    pub delivered: u64,
    /// Envelopes that failed to open (no key, tampered, wrong epoch, bad signature…).
    pub rejected: u64,
    /// Messages dropped as duplicates.
    pub duplicates: u64,
    /// Messages the relay reported dropped for this connection (slow consumer).
    pub relay_gaps: u64,
}

#[derive(Debug)]
struct LocalSub {
    filter: TopicFilter,
    opts: SubscribeOptions,
    relay_ids: Vec<u64>,
    /// The highest relay sequence delivered to this subscription (0: none yet).
    last_seq: u64,
}

/// How a subscription starts and what it asks of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Delivery guarantee wanted from the relay.
    pub qos: Qos,
    /// Start in the relay's history (from a sequence, a time, or the last N per topic)
    /// before live messages; needs a relay with a store.
    pub replay: Option<frame::Replay>,
    /// A durable subscription name: the relay remembers the position under it.
    pub durable: Option<String>,
    /// Deliver the retained value of each matching topic first (default true).
    pub retained: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            qos: Qos::AtMostOnce,
            replay: None,
            durable: None,
            retained: true,
        }
    }
}

impl SubscribeOptions {
    /// Live messages only, at most once, retained values first.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the delivery guarantee.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }
    /// Starts with history.
    pub fn replay(mut self, replay: frame::Replay) -> Self {
        self.replay = Some(replay);
        self
    }
    /// Names a durable subscription.
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }
    /// Whether to receive retained values first.
    pub fn retained(mut self, yes: bool) -> Self {
        self.retained = yes;
        self
    }
}

/// What identifies one delivery: the local subscription and the sealed `(tree, sender,
/// msg_id)` (CRYPTO.md receiver check 6). Per subscription, so a new subscription that asks
/// for history gets messages an older one already saw, while each subscription still sees
/// every message once across reconnects, replays, redeliveries and publisher re-sends.
type DedupKey = (LocalSubId, TreeId, [u8; 32], [u8; 16]);

/// Bounded set of recently delivered [`DedupKey`]s (oldest forgotten first).
#[derive(Debug)]
struct Dedup {
    seen: HashSet<DedupKey>,
    order: VecDeque<DedupKey>,
    cap: usize,
}

impl Dedup {
    fn new(cap: usize) -> Self {
        Dedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }
    /// True if new (and remembers it).
    fn insert(&mut self, key: DedupKey) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// Per-topic sealing options with a default.
#[derive(Debug, Clone)]
pub struct SealPolicy {
    /// Used where no per-topic rule matches.
    pub default: SealOptions,
    /// First matching filter wins.
    pub per_topic: Vec<(TopicFilter, SealOptions)>,
    /// Sign messages with the identity (when one is configured).
    pub sign: bool,
}

impl Default for SealPolicy {
    fn default() -> Self {
        SealPolicy {
            default: SealOptions::default(),
            per_topic: Vec::new(),
            sign: true,
        }
    }
}

impl SealPolicy {
    /// The options for `topic`.
    pub fn for_topic(&self, topic: &Topic) -> SealOptions {
        self.per_topic
            .iter()
            .find(|(f, _)| f.matches(topic))
            .map(|(_, o)| *o)
            .unwrap_or(self.default)
    }
}

/// Seals one message for publishing: the part of publishing that needs keys. Shared by the
/// tokio and wasm clients; `sealer` keeps its compression context between calls.
#[allow(clippy::too_many_arguments)]
pub fn seal_publish(
    keyring: &RwLock<Keyring>,
    identity: Option<&Identity>,
    policy: &SealPolicy,
    sealer: &mut Sealer,
    topic: &Topic,
    content_type: &str,
    payload: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(whispeer_protocol::Envelope, MessageId), PublishError> {
    let key = keyring.read().expect("keyring lock").topic_key(topic)?;
    let msg_id = MessageId::random(rng);
    let out = Outgoing {
        payload,
        content_type,
        msg_id,
        ts_ms: now_ms,
    };
    let signer = if policy.sign { identity } else { None };
    let env = sealer.seal(&key, &out, &policy.for_topic(topic), signer, rng)?;
    Ok((env, msg_id))
}

/// Builds the `Pub` frame for an envelope.
pub fn pub_frame(
    envelope: whispeer_protocol::Envelope,
    publish_id: Option<[u8; 16]>,
    retain: bool,
    qos: Qos,
) -> Frame {
    let mut flags = 0;
    if retain {
        flags |= frame::pub_flags::RETAIN;
    }
    if publish_id.is_some() {
        flags |= frame::pub_flags::ACK;
    }
    Frame::Pub(Pub {
        envelope,
        flags,
        publish_id,
        qos,
    })
}

/// The subscription side of a client connection.
#[derive(Debug)]
pub struct ClientCore {
    keyring: Arc<RwLock<Keyring>>,
    opener: Opener,
    subs: HashMap<LocalSubId, LocalSub>,
    relay_to_local: HashMap<u64, LocalSubId>,
    next_relay_id: u64,
    dedup: Dedup,
    stats: CoreStats,
    last_seq: u64,
}

impl ClientCore {
    /// A core over a shared keyring.
    pub fn new(keyring: Arc<RwLock<Keyring>>) -> Self {
        ClientCore {
            keyring,
            opener: Opener::new(),
            subs: HashMap::new(),
            relay_to_local: HashMap::new(),
            next_relay_id: 1,
            dedup: Dedup::new(200_000),
            stats: CoreStats::default(),
            last_seq: 0,
        }
    }

    /// The first frame of every connection.
    pub fn hello(client: &str) -> Frame {
        Frame::Hello(Hello {
            versions: vec![frame::PROTOCOL_VERSION],
            features: frame::features::AT_LEAST_ONCE
                | frame::features::EXACTLY_ONCE
                | frame::features::RETAIN
                | frame::features::REPLAY
                | frame::features::DURABLE,
            client: Some(client.to_owned()),
            auth: None,
            account: None,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// The relay reported dropped messages.
    pub fn on_gap(&mut self, dropped: u64) {
        self.stats.relay_gaps += dropped;
    }

    /// The highest relay sequence seen (resume point after a reconnect).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// `Sub` frames for one subscription. A subscription that already received stored
    /// messages resumes right after the last one it saw (no gap across a reconnect or a key
    /// change; the relay replays what it kept, and dedup drops what was already delivered);
    /// a durable one resumes where the relay remembers it.
    fn sub_frames(&mut self, id: LocalSubId, now_ms: u64) -> Vec<Frame> {
        let Some(sub) = self.subs.get_mut(&id) else {
            return Vec::new();
        };
        let resuming = sub.last_seq > 0 && sub.opts.durable.is_none();
        let replay = if resuming {
            Some(frame::Replay::FromSeq(sub.last_seq + 1))
        } else {
            sub.opts.replay
        };
        let retained = sub.opts.retained && !resuming;
        for old in sub.relay_ids.drain(..) {
            self.relay_to_local.remove(&old);
        }
        let patterns = self
            .keyring
            .read()
            .expect("keyring lock")
            .compile(&sub.filter, now_ms);
        let mut frames = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let rid = self.next_relay_id;
            self.next_relay_id += 1;
            sub.relay_ids.push(rid);
            self.relay_to_local.insert(rid, id);
            frames.push(Frame::Sub(Sub {
                sub_id: rid,
                pattern,
                qos: sub.opts.qos,
                durable: sub.opts.durable.clone(),
                replay,
                retained,
                credit: None,
                owner: None,
            }));
        }
        frames
    }

    /// Registers a subscription and returns the `Sub` frames to send (one per tree epoch
    /// whose grants could cover a matching topic).
    pub fn subscribe(
        &mut self,
        id: LocalSubId,
        filter: TopicFilter,
        qos: Qos,
        now_ms: u64,
    ) -> Result<Vec<Frame>, SubscribeError> {
        self.subscribe_with_options(id, filter, SubscribeOptions::new().qos(qos), now_ms)
    }

    /// Like [`ClientCore::subscribe`] with replay, durable name and retained options.
    pub fn subscribe_with_options(
        &mut self,
        id: LocalSubId,
        filter: TopicFilter,
        opts: SubscribeOptions,
        now_ms: u64,
    ) -> Result<Vec<Frame>, SubscribeError> {
        self.subs.insert(
            id,
            LocalSub {
                filter: filter.clone(),
                opts,
                relay_ids: Vec::new(),
                last_seq: 0,
            },
        );
        let frames = self.sub_frames(id, now_ms);
        if frames.is_empty() {
            self.subs.remove(&id);
            return Err(SubscribeError::NoKey {
                filter: filter.to_string(),
            });
        }
        Ok(frames)
    }

    /// The relay subscription ids of a local subscription.
    pub fn relay_ids(&self, id: LocalSubId) -> &[u64] {
        self.subs
            .get(&id)
            .map(|s| s.relay_ids.as_slice())
            .unwrap_or(&[])
    }

    /// The local subscription a relay subscription id belongs to.
    pub fn local_for(&self, relay_id: u64) -> Option<LocalSubId> {
        self.relay_to_local.get(&relay_id).copied()
    }

    /// Drops a subscription; returns the `Unsub` frames.
    pub fn unsubscribe(&mut self, id: LocalSubId) -> Vec<Frame> {
        let Some(sub) = self.subs.remove(&id) else {
            return Vec::new();
        };
        sub.relay_ids
            .into_iter()
            .map(|rid| {
                self.relay_to_local.remove(&rid);
                Frame::Unsub(Unsub { sub_id: rid })
            })
            .collect()
    }

    /// After a reconnect (or a key change): `Sub` frames for every subscription, recompiled
    /// against the keyring as it is now (new epochs included).
    pub fn resubscribe_all(&mut self, now_ms: u64) -> Vec<Frame> {
        let ids: Vec<LocalSubId> = self.subs.keys().copied().collect();
        ids.into_iter()
            .flat_map(|id| self.sub_frames(id, now_ms))
            .collect()
    }

    /// Opens a delivered message once and returns it with every local subscription whose
    /// filter matches its topic. A message that does not open, or is a duplicate, yields
    /// nothing (and is counted): the client reveals nothing about it to the relay.
    pub fn receive(&mut self, msg: &Msg, now_ms: u64) -> Option<(Arc<Received>, Vec<LocalSubId>)> {
        if msg.seq > self.last_seq {
            self.last_seq = msg.seq;
        }
        let opened = {
            let kr = self.keyring.read().expect("keyring lock");
            self.opener.open(&kr, &msg.envelope, now_ms)
        };
        let o = match opened {
            Ok(o) => o,
            Err(_) => {
                self.stats.rejected += 1;
                return None;
            }
        };
        let sender = o.sender.map(|s| s.to_bytes()).unwrap_or([0; 32]);
        let mut matched = false;
        let mut targets: Vec<LocalSubId> = Vec::new();
        for (id, s) in self.subs.iter_mut() {
            if !s.filter.matches(&o.topic) {
                continue;
            }
            matched = true;
            s.last_seq = s.last_seq.max(msg.seq);
            if self.dedup.insert((*id, o.tree_id, sender, o.msg_id.0)) {
                targets.push(*id);
            }
        }
        if targets.is_empty() {
            if matched {
                self.stats.duplicates += 1;
            }
            return None;
        }
        self.stats.delivered += 1;
        let r = Received {
            topic: o.topic,
            sender: o.sender,
            msg_id: o.msg_id,
            ts_ms: o.ts_ms,
            seq: msg.seq,
            content_type: o.content_type,
            payload: Bytes::from(o.payload),
            retained: msg.flags & frame::msg_flags::RETAINED != 0,
        };
        Some((Arc::new(r), targets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use whispeer_protocol::{Scope, TreeKey};

    #[test]
    fn open_once_deliver_to_matching_dedup() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let tk = TreeKey::generate("t", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key(&tk, 0).unwrap();
        let kr = Arc::new(RwLock::new(kr));
        let id = Identity::generate(&mut rng);
        let mut core = ClientCore::new(kr.clone());
        assert_eq!(
            core.subscribe(1, TopicFilter::new("a/#").unwrap(), Qos::AtMostOnce, 0)
                .unwrap()
                .len(),
            1
        );
        core.subscribe(2, TopicFilter::new("a/+").unwrap(), Qos::AtMostOnce, 0)
            .unwrap();
        core.subscribe(3, TopicFilter::new("b").unwrap(), Qos::AtMostOnce, 0)
            .unwrap();
        let topic = Topic::new("a/x").unwrap();
        let (env, _) = seal_publish(
            &kr,
            Some(&id),
            &SealPolicy::default(),
            &mut Sealer::new(),
            &topic,
            CBOR,
            b"\x01",
            5,
            &mut rng,
        )
        .unwrap();
        let msg = Msg {
            seq: 9,
            envelope: env,
            flags: 0,
        };
        let (r, mut to) = core.receive(&msg, 0).unwrap();
        to.sort();
        assert_eq!(to, vec![1, 2]);
        assert_eq!(r.sender, Some(id.sender_id()));
        assert_eq!(core.last_seq(), 9);
        assert!(core.receive(&msg, 0).is_none(), "duplicate dropped");
        assert_eq!(core.stats().duplicates, 1);

        // After a reconnect, subscriptions that saw stored messages resume right after the
        // last one (without retained values again); the others start as they first did.
        let mut resumed: Vec<(u64, Option<frame::Replay>, bool)> = core
            .resubscribe_all(0)
            .into_iter()
            .map(|f| match f {
                Frame::Sub(s) => (core.local_for(s.sub_id).unwrap(), s.replay, s.retained),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        resumed.sort_by_key(|r| r.0);
        use frame::Replay::FromSeq;
        assert_eq!(
            resumed,
            vec![
                (1, Some(FromSeq(10)), false),
                (2, Some(FromSeq(10)), false),
                (3, None, true)
            ]
        );
        assert_eq!(core.unsubscribe(1).len(), 1);
    }

    #[test]
    fn no_key_no_subscription_and_rejections_counted() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let tk = TreeKey::generate("t", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_grant(tk.grant(&Scope::Subtree(Topic::new("a").unwrap())), 0)
            .unwrap();
        let mut core = ClientCore::new(Arc::new(RwLock::new(kr)));
        assert!(matches!(
            core.subscribe(1, TopicFilter::new("b/#").unwrap(), Qos::AtMostOnce, 0),
            Err(SubscribeError::NoKey { .. })
        ));
        core.subscribe(2, TopicFilter::new("#").unwrap(), Qos::AtMostOnce, 0)
            .unwrap();
        // A message on b/x sealed by a full-tree holder: name visible to the tree, body not.
        let mut full = Keyring::new();
        full.add_tree_key(&tk, 0).unwrap();
        let full = RwLock::new(full);
        let (env, _) = seal_publish(
            &full,
            None,
            &SealPolicy::default(),
            &mut Sealer::new(),
            &Topic::new("b/x").unwrap(),
            CBOR,
            b"x",
            0,
            &mut rng,
        )
        .unwrap();
        assert!(core
            .receive(
                &Msg {
                    seq: 1,
                    envelope: env,
                    flags: 0
                },
                0
            )
            .is_none());
        assert_eq!(core.stats().rejected, 1);
    }
}
