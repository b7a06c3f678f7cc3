//! The runtime-free client core: everything about messages that does not touch a socket or a
//! clock. The tokio client and the WebAssembly client both drive this same code with their
//! own transport and timer (DESIGN §7), so nothing about messages is written twice.
//!
//! It holds the subscriptions and their filters, compiles filters to token patterns for
//! every accepted epoch, opens delivered envelopes once and hands them to every local
//! subscription whose filter matches, runs the receiver checks of PROTOCOL §4.11
//! ([`receive`]: dedup across subscriptions within a time horizon, clock skew, retained
//! values that never move backwards, publisher policies) and counts refusals by reason.
//! [`acks`] is the ack queue that keeps acks in relay-sequence order whatever the outcome.
//! [`connection`] is the sans-IO connection engine both clients drive. [`batching`] holds
//! prepared publishes until one batch signature covers them (PROTOCOL §4.14). `withheld`
//! tracks messages held back from subscriptions that had room, so one that loses such a
//! message hears of it.

pub mod acks;
pub mod batching;
pub mod connection;
pub mod jobs;
pub mod receive;
mod withheld;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rand_core::CryptoRngCore;
use whispeer_protocol::frame::{self, Hello, Msg, Pub, Sub, Unsub};
use whispeer_protocol::{
    BatchPolicy, Frame, Identity, Keyring, MessageId, OpenError, Opener, Outgoing, Prepared,
    Provenance, Qos, SealOptions, Sealer, SenderId, SharedRoots, Topic, TopicFilter, TreeId,
    VerifiedRoots,
};

use crate::error::{PublishError, SubscribeError};
use jobs::Unsealed;

/// Content type of typed (serde → CBOR) messages.
pub const CBOR: &str = "application/cbor";
/// Content type of raw byte messages.
pub const OCTETS: &str = "application/octet-stream";
/// The content type of a retained-value *clear* (PROTOCOL §4.11): a sealed, signed, empty
/// message published with `RETAIN` that replaces a topic's retained value. Receivers never
/// hand it to the application; its date still raises the topic's retained high-water mark,
/// so the relay cannot bring the cleared value back. The relay cannot tell it from any
/// other retained publish.
pub const CLEAR_RETAINED: &str = "application/vnd.whispeer.clear-retained";

/// A local subscription id (one per `subscribe` call).
pub type LocalSubId = u64;

/// A delivered, opened, verified message before it is decoded into the subscriber's type.
/// Built with [`Received::from_opened`] outside this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The tree whose key opened it.
    pub tree_id: TreeId,
    /// The key epoch it was sealed under.
    pub epoch: u64,
    /// How the grant whose key opened it is held: admin-signed, derived from a broader
    /// verified grant, or delegated by an identity nothing confirms.
    pub provenance: Provenance,
}

impl Received {
    /// A message opened from an envelope: `seq` is the relay's sequence (0 when it did not
    /// store it), `retained` whether the relay delivered it as the topic's retained value.
    pub fn from_opened(o: whispeer_protocol::Opened, seq: u64, retained: bool) -> Self {
        Received {
            topic: o.topic,
            sender: o.sender,
            msg_id: o.msg_id,
            ts_ms: o.ts_ms,
            seq,
            content_type: o.content_type,
            payload: Bytes::from(o.payload),
            retained,
            tree_id: o.tree_id,
            epoch: o.epoch,
            provenance: o.provenance,
        }
    }
}

/// Counters a client keeps (and exposes as metrics).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoreStats {
    /// Messages opened and delivered.
    pub delivered: u64,
    /// Envelopes that failed to open (no key, tampered, wrong epoch, bad signature…).
    pub rejected: u64,
    /// Messages dropped as duplicates.
    pub duplicates: u64,
    /// Messages the relay reported dropped for this connection (slow consumer).
    pub relay_gaps: u64,
    /// Opened messages refused by the receiver checks, by reason (duplicates are counted
    /// in `duplicates`).
    pub refused: receive::RefusedStats,
    /// Envelopes left unacknowledged because an at-least-once subscription the relay routed
    /// them to had no room, whatever they held (the relay delivers them again). Stays 0
    /// while the relay honours the credit.
    pub held_back: u64,
    /// Envelopes left unacknowledged, although every at-least-once subscription the relay
    /// routed them to had room, because one of them awaits an earlier message the relay
    /// sends it again and must not get this one first (PROTOCOL §3.5.5 "Order": a live copy
    /// that reached the client for a neighbour while the relay had that subscription
    /// paused); the relay delivers them again, in order.
    pub held_for_order: u64,
    /// Live copies a relay named a subscription paused in (`Msg.paused`: sent for a
    /// neighbour while the relay had that subscription's delivery paused for credit), not
    /// handed to it: its own copy follows in its catch-up, in order (PROTOCOL §3.5.5
    /// "Paused beside other subscriptions"). Counted once per copy.
    pub named_paused: u64,
    /// Messages a subscription lost because they were held back from it for another one
    /// (counted in `held_back` or `held_for_order`) and did not come again: a message the
    /// store does not keep, held back while the relay had an at-least-once neighbour
    /// paused. Each is reported to that subscription as dropped (its `Lagged`).
    pub withheld_lost: u64,
    /// Payloads decompressed (or tried: one over the cap counts too), here or by an open
    /// job. Only messages delivered are decompressed after the receiver checks; an open job
    /// decompresses at once a payload within a small multiple of its envelope
    /// ([`jobs::decompresses_early`]), so this may count duplicates of those.
    pub decompressed: u64,
    /// Batch-signed messages (PROTOCOL §4.14) whose batch signature this client had already
    /// verified: each skipped one Ed25519 verification.
    pub batch_root_hits: u64,
    /// Batch roots verified twice because two parallel opens met a new batch at once (see
    /// [`jobs`]): the price of opening in parallel, a few per run at most.
    pub batch_root_races: u64,
    /// Authentic messages compressed with a dictionary this client does not hold (counted
    /// in `rejected` too). Each missing dictionary is logged once (the first
    /// [`WARNED_DICTIONARIES`] of them): a member sending bodies naming random dictionary
    /// ids cannot flood the log.
    pub missing_dictionary: u64,
}

/// Distinct missing dictionaries a client logs a warning for (then only counts).
pub const WARNED_DICTIONARIES: usize = 16;

/// The numbering a relay's sequence numbers belong to (PROTOCOL §3.5.7): resume positions
/// (`Replay::FromSeq` after the last sequence seen) mean something only on a relay of the
/// same space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqSpace {
    /// Named by the relay in `Welcome.seq_space`: one per store, shared by a cluster.
    Named([u8; 16]),
    /// A relay that names none (older relays): its own space, known only by the address the
    /// client dialed (an index into the client's relay list).
    Unnamed(usize),
}

#[derive(Debug)]
struct LocalSub {
    filter: TopicFilter,
    /// The one tree this subscription is bound to (PROTOCOL §4.11, receiving): its patterns
    /// are compiled for this tree only — on every resubscribe, whatever grants of other
    /// trees arrive later — and only messages this tree's key opened are delivered to it.
    tree: TreeId,
    opts: SubscribeOptions,
    relay_ids: Vec<u64>,
    /// Per relay subscription (as `relay_ids`): where it started on this connection, which
    /// decides whether a redelivered copy is its ([`LocalSub::takes_redelivered`]).
    starts: Vec<Start>,
    /// Sequences routed to it on this connection that it did not take — held back for want
    /// of room, for the order below, or because it was in its hand-over (`skipped`) — by
    /// key id (a relay orders messages per key id): the relay sends each again (PROTOCOL
    /// §3.5.5 "Order"). Held back for want of room, the relay either tracks the first copy
    /// (it redelivers it after its ack timeout, as nothing acks it) or had this
    /// subscription's delivery *paused* at it: it keeps the message in its store and sends
    /// it, in sequence order, once acks free credit (its catch-up, a live-kind `Msg` naming
    /// no subscription). Meanwhile a neighbour on the same connection matching the same
    /// messages keeps getting live copies, which name no subscription either: taken here,
    /// a later one would come before the earlier ones the relay still owes this
    /// subscription. So a live-kind `Msg` that another
    /// subscription could have been sent ([`ClientCore::live_for_another`]), above the
    /// lowest sequence of its key id here and not itself one of them, is held back too
    /// ([`ClientCore::waits_for_earlier`]): the relay sends it again in order (from the
    /// store if it skipped it for this subscription, else as a redelivery). A copy of one
    /// of them that it takes (or passes as a placeholder) settles it and every lower one of
    /// its key id (the relay sends in sequence order, so a lower one not sent by then is
    /// one it will not send: not kept by its store, reported in a `Gap`); so does a `Msg`
    /// that only this subscription could have been sent (its own stream), and a `Gap`
    /// naming one of its relay subscriptions settles that key id's
    /// ([`ClientCore::lost_while_paused`]). Normally empty;
    /// at most [`MAX_GOT`] (once full it is emptied: messages are taken as they come, in
    /// order or not, never lost); emptied on every `Sub` (a new relay subscription
    /// resumes by position).
    behind: std::collections::BTreeSet<(whispeer_protocol::KeyId, u64)>,
    /// Sequences (by key id) whose copy held back was this subscription's own, not in
    /// `behind`: the relay sent it for this subscription (naming it, as a redelivery, or
    /// live while it was not paused, [`ClientCore::sent_to`]) and tracks it until acked —
    /// the client acks no sequence it held back — so it comes again as a redelivery after
    /// the relay's ack timeout, *out of order*: nothing to hold later copies back for (the
    /// order rule is for what a paused subscription's catch-up sends in order), and neither
    /// a later copy of its own stream nor a `Gap` ending its catch-up settles it — only a
    /// copy of that sequence. Until then its resume position stays below it: a cut resumes
    /// it from there ([`LocalSub::resume_below_sent_back`]). Before: a later copy of its
    /// own history settled it and moved the position past it, and the `Gap` ending its
    /// catch-up forgave it, so the redelivery, a duplicate of a neighbour's copy by then,
    /// was dropped (found by `tests/mixed_load.rs` with cuts). At most [`MAX_GOT`] (once
    /// full it is emptied). Emptied on every `Sub`.
    sent_back: std::collections::BTreeSet<(whispeer_protocol::KeyId, u64)>,
    /// Its own retained values (`RETAINED`, naming it) held back on this connection for
    /// want of room, by relay sequence: the relay sends retained values under the credit
    /// and tracks them (PROTOCOL §3.5.5), so it sends such a value again as a redelivered
    /// copy — which names no subscription and is at or below this one's boundary, yet is
    /// its own ([`LocalSub::takes_redelivered`]). Normally empty (a relay keeps to the
    /// credit); at most [`MAX_GOT`].
    held_retained: std::collections::HashSet<u64>,
    /// An unnumbered `Msg` (sequence 0: live-only with the cluster's JetStream store) was
    /// routed to it on this connection: the relay tracks nothing for those, and drops them
    /// from a full queue like QoS 0 messages, counting them in the connection's `Gap` — one
    /// that then is this subscription's to hear even if it acknowledges
    /// ([`ClientCore::hears_connection_gaps`]).
    unnumbered: bool,
    /// The highest relay sequence delivered to this subscription (0: none yet).
    last_seq: u64,
    /// Per key id: the highest relay sequence handled for this subscription, or the
    /// boundary (`SubOk.seq`, `ReplayDone.seq`) from which its live messages follow. A
    /// relay orders messages per key id only (it routes key ids in parallel, PROTOCOL
    /// §3.5.5): a message of one key id may arrive after a later-numbered one of another,
    /// so each of this subscription's patterns resumes from its own key id's position.
    positions: HashMap<whispeer_protocol::KeyId, u64>,
    /// With an explicit `replay`: the messages this subscription received. History it
    /// asked for may hold messages another subscription already delivered; those (flagged
    /// replayed, and only once per subscription) are still its to see. At most
    /// [`MAX_GOT`]: the relay ends it (`ReplayDone`), and one that never does must not
    /// make it grow with every live message; once full, no more exceptions (a replayed
    /// duplicate is refused: history possibly missed, never a message twice).
    got: Option<std::collections::HashSet<receive::DedupKey>>,
    /// `got` was made for a resume (not an explicit replay): a history copy the dedup
    /// window has passes for it only if it entered the window on this connection
    /// (`ClientCore::resume_new`) — a relay replaying a message from before the reconnect
    /// under a higher sequence gets no exception.
    resumed: bool,
    /// Messages held back from it on an earlier connection that it never had (their
    /// digests, at most [`MAX_GOT`]): its resumed history brings them again, duplicates in
    /// the window if another subscription took them, and still passes them to it, once.
    /// Emptied when its history ends.
    carried: std::collections::HashSet<receive::Digest>,
    /// Relay ids whose history (`ReplayDone`) has not ended yet; once none is left, `got`
    /// is dropped (live messages need no exception, and it would grow without bound).
    replaying: Vec<u64>,
    /// The compiled token patterns of its relay subscriptions.
    patterns: Vec<whispeer_protocol::TokenPattern>,
    /// With retained values asked for: per topic (the first 8 bytes of its
    /// [`receive::retained_key`]), the message it was last delivered there (the low 8 bytes
    /// of its dedup [`receive::Digest`]), live or retained. The relay sets `RETAINED` outside
    /// the seal: a message already delivered elsewhere in this client is shown to this
    /// subscription as its topic's current value only if it is not the one this
    /// subscription last got on that topic — so never twice to one subscription, whether
    /// it first came live, as history or as a retained value, in this connection or an
    /// earlier one. (A relay may send a retained value after a live message of the same
    /// connection: live messages are held back per subscription, and one for another
    /// subscription of the client carries no `sub_id`.) At most [`MAX_SHOWN`] topics;
    /// once full, no message already delivered is shown to it again (`latest_full`).
    latest: HashMap<u64, u64>,
    /// `latest` could not take a topic: duplicates are no longer re-shown to it.
    latest_full: bool,
    /// Relay ids whose history the relay said (`SubOk.history`) ends with `ReplayDone`, not
    /// ended yet. Until then the relay holds back their live messages and sends them after
    /// `ReplayDone`; a live `Msg` names no subscription, so one that reaches the client
    /// meanwhile for another subscription of the connection is not this one's yet: taken
    /// now it would come before this subscription's history (or retained values) and
    /// before the live messages held back earlier. With each, its boundary (`SubOk.seq`):
    /// the relay holds back what it routes after it — also a message that reaches the
    /// client meanwhile in another subscription's history or retained values.
    held: Vec<(u64, u64)>,
    /// Its `Sub`s on this connection asked for retained values: while `held` is not empty
    /// then, it has not had them all.
    asked_retained: bool,
    /// Live messages this subscription did not take while held (see `held`), by relay
    /// sequence, with their dedup digest: the relay's own copy, which follows, is still this
    /// subscription's although the dedup window has seen it. Only messages new to this
    /// client when they were held back, and only a copy with the same digest: the sequence
    /// is the relay's to choose, so an exception keyed by it alone let a relay replay any
    /// delivered message once per sequence it had sent while the subscription was held
    /// (review of wave 2 session 42). Every held-back sequence takes an entry at first
    /// sight (`None`), whatever became of the message (a duplicate, unopenable, held back
    /// for lack of room): each is owed an ack (`AckQueue::owe`), and this set is what bounds
    /// those debts; a message new to the client fills in its digest (`Some`), and only
    /// those let a copy past the dedup window. At most [`MAX_GOT`]: once full, live
    /// messages are taken as they come again (in order or not, never lost).
    skipped: HashMap<u64, Option<receive::Digest>>,
    /// The sequences of `skipped` holding a digest, by that digest. Once this subscription
    /// gets a copy of the message under any sequence, the exception is spent for every
    /// one of them ([`LocalSub::copy_came`]): the relay may hold one envelope under two
    /// sequences (a QoS 1 publish re-sent after a lost `PubAck`, or re-posted): a
    /// subscription that took it from its own history at the older one also got the
    /// relay's held-back copy at the newer one, the message twice, when only the copy at
    /// the remembered sequence spent it.
    awaiting: HashMap<receive::Digest, Vec<u64>>,
    /// Copies a relay named this subscription paused in (`Msg.paused`: a neighbour's live
    /// copy, PROTOCOL §3.5.5 "Paused beside other subscriptions"), by (relay subscription,
    /// sequence), on this connection: its `skipped` entries (the catch-up's copy passes
    /// the dedup window, and the sequence is owed to it) until its copy came, or until it
    /// is known not to come — a `Gap` naming that relay subscription (its store did not
    /// keep it), or a later copy that relay subscription took (the catch-up sends in
    /// sequence order) — when the debt is forgiven ([`ClientCore::take_forgiven`]).
    /// Never taken, such a copy moves no resume position: a reconnect before the catch-up
    /// asks for it again. Within `skipped`'s bound; emptied on every `Sub`.
    paused_skips: std::collections::BTreeSet<(u64, u64)>,
    /// Unnumbered messages (sequence 0: live-only with the cluster's JetStream store) that
    /// first reached this client in a copy the relay named for another subscription, and
    /// that this one matches, by dedup digest. The relay holds a live message back for
    /// each subscription in its hand-over and then sends each its own named copy: this
    /// one's follows and is a duplicate to the dedup window, yet still this one's (it
    /// was dropped so: found with a slow hand-over, two subscriptions on one topic — one
    /// of them lost every unnumbered message published during it). Unnumbered copies
    /// cannot be told apart by sequence (as `skipped` does), so by digest, each spent by
    /// the copy it lets past. At most [`MAX_GOT`]; emptied on every `Sub`.
    unnumbered_owed: std::collections::HashSet<receive::Digest>,
    /// Sequences a neighbour's copy (one of its history, say) reached the client at while
    /// this subscription's own history — relay subscription, sequence — will still bring
    /// them ([`ClientCore::history_awaits`]): the neighbour's `Ack` of the sequence frees it
    /// for the whole connection, so, if it reached the relay after the relay sent this
    /// one's copy and that copy was held back for want of room, the relay would never send
    /// it again. Owed in the ack queue until this one's copy came (its slot pays the debt)
    /// or is known not to come: its history passed the sequence (it sends in order) or
    /// ended — then forgiven ([`ClientCore::take_forgiven`]). Found by
    /// `tests/mixed_load.rs` with cuts: two resumed subscriptions, the faster history's
    /// acks freed what the slower one had held back. At most [`MAX_GOT`]; emptied on
    /// every `Sub`.
    history_debts: std::collections::BTreeSet<(u64, u64)>,
}

/// Where a relay subscription started on the current connection (see
/// [`LocalSub::takes_redelivered`]). Kept apart from `positions`, which move on with every
/// message handled.
#[derive(Debug, Clone, Copy)]
struct Start {
    /// Its boundary, `SubOk.seq` (`None` until confirmed): its live messages are above it.
    boundary: Option<u64>,
    /// The lowest sequence of the history it asked for whose deliveries the relay tracks,
    /// and so may redeliver: a replay (from its `FromSeq`, else from anywhere) or a durable
    /// (the relay resumes one from its own floor, unknown here). `None`: none — live only,
    /// or retained values only (the relay does not track those: they need no ack).
    history_from: Option<u64>,
}

/// A (topic, message) pair as [`LocalSub::latest`] holds it: the first 8 bytes of the
/// topic's retained key, the low 8 bytes of the message's dedup digest.
fn latest_pair(topic: receive::RetainedKey, digest: receive::Digest) -> (u64, u64) {
    let mut t = [0u8; 8];
    t.copy_from_slice(&topic[..8]);
    (u64::from_le_bytes(t), digest as u64)
}

/// Whether `msg` is of the live kind: numbered, naming no subscription, and neither
/// history (`REPLAYED`, `RETAINED`) nor a redelivery (`REDELIVERED`). The relay sends such
/// a `Msg` once per connection for whichever of its subscriptions it is delivered to, and
/// its catch-up of a paused subscription (PROTOCOL §3.5.5) looks the same.
fn live_kind(msg: &Msg) -> bool {
    let flags =
        frame::msg_flags::REPLAYED | frame::msg_flags::RETAINED | frame::msg_flags::REDELIVERED;
    msg.seq > 0 && msg.sub_id.is_none() && msg.flags & flags == 0
}

/// Most topics a subscription remembers its last delivered message of (16 bytes each).
const MAX_SHOWN: usize = 65_536;

/// Most messages a subscription in its history remembers as received (~100 bytes each).
const MAX_GOT: usize = if cfg!(test) { 64 } else { 100_000 };

/// Most sequences one subscription is remembered holding back for its hand-over (its
/// `skipped` entries, each of which may be owed an ack): what bounds those debts.
pub const MAX_HELD: usize = MAX_GOT;

impl LocalSub {
    /// A message new to the client, with dedup digest `d`, is held back for this
    /// subscription at `seq` (its `skipped` entry, taken at first sight): the relay's own
    /// copy of it there is still this subscription's. Whether it was remembered (not
    /// already awaited there): what a durable then awaits ([`ClientCore::awaited`]).
    fn await_copy(&mut self, seq: u64, d: receive::Digest) -> bool {
        let Some(slot @ None) = self.skipped.get_mut(&seq) else {
            return false;
        };
        *slot = Some(d);
        self.awaiting.entry(d).or_default().push(seq);
        true
    }

    /// A copy of the message with dedup digest `d` came to this subscription at `seq`
    /// (handed to it, or lost for want of room): the copy it awaited at `seq` came, and it
    /// awaits no other copy of `d` — the exceptions kept for `d` under other sequences are
    /// spent (their entries stay, digest-less: each still bounds an ack owed to it).
    /// Returns the digests it no longer awaits (to drop from [`ClientCore::awaited`]).
    fn copy_came(&mut self, seq: u64, d: receive::Digest) -> [Option<receive::Digest>; 2] {
        let mut done = [None, None];
        if self.skipped.is_empty() {
            return done; // nearly always: no held-back sequence remembered
        }
        done[0] = self.forget_skipped(seq);
        if let Some(seqs) = self.awaiting.remove(&d) {
            for s in seqs {
                if let Some(slot) = self.skipped.get_mut(&s) {
                    *slot = None;
                }
            }
            done[1] = Some(d);
        }
        done
    }

    /// Drops the `skipped` entry of `seq`; its digest, if it had one (no longer awaited).
    fn forget_skipped(&mut self, seq: u64) -> Option<receive::Digest> {
        let x = self.skipped.remove(&seq)??;
        if let Some(seqs) = self.awaiting.get_mut(&x) {
            seqs.retain(|s| *s != seq);
            if seqs.is_empty() {
                self.awaiting.remove(&x);
            }
        }
        Some(x)
    }

    /// The relay subscription of this one that a live copy names paused (`Msg.paused`)
    /// and whose pattern it matches: the copy was sent for a neighbour, and this
    /// subscription's own follows in its catch-up, after the earlier messages the relay
    /// skipped for it (PROTOCOL §3.5.5 "Paused beside other subscriptions").
    fn paused_for(&self, msg: &Msg) -> Option<u64> {
        let named = msg.paused.as_deref()?;
        if !live_kind(msg) {
            return None;
        }
        let path = msg.envelope.token_path();
        self.relay_ids
            .iter()
            .zip(&self.patterns)
            .find(|(rid, p)| named.contains(rid) && p.matches(&path))
            .map(|(rid, _)| *rid)
    }

    /// Raises the position of relay subscription `relay_id`'s key id to `seq`.
    fn reached(&mut self, relay_id: u64, seq: u64) {
        if let Some(i) = self.relay_ids.iter().position(|r| *r == relay_id) {
            if let Some(p) = self.patterns.get(i) {
                let pos = self.positions.entry(*p.key_id()).or_insert(0);
                *pos = (*pos).max(seq);
            }
        }
    }

    /// Whether a redelivered copy (`REDELIVERED`, no `sub_id`, PROTOCOL §3.3.7) may be this
    /// subscription's. The relay redelivers a sequence it sent to a subscription of the
    /// connection that did not ack it, naming none, so the copy may be another one's: of a
    /// relay subscription of this one matching it, it is a live message above that one's
    /// boundary (held back while in its hand-over, `holds_back`), or history it asked for
    /// at or below it. A subscription without such history gets nothing at or below its
    /// boundary (nor before its `SubOk`): that is another subscription's history — the
    /// client had not seen it (held back for want of room), so no dedup would stop it,
    /// and a live-only subscription got a message from before it started.
    fn takes_redelivered(&self, msg: &Msg) -> bool {
        if msg.seq == 0 {
            return true; // unnumbered: no start to compare (and never redelivered)
        }
        if self.held_retained.contains(&msg.seq) {
            return true; // its own retained value, held back for want of room
        }
        let path = msg.envelope.token_path();
        self.patterns.iter().zip(&self.starts).any(|(p, st)| {
            (st.boundary.is_some_and(|b| msg.seq > b)
                || st.history_from.is_some_and(|from| msg.seq >= from))
                && p.matches(&path)
        })
    }

    /// The lowest sequence of key id `key` it did not take and awaits again (see `behind`).
    fn first_behind(&self, key: &whispeer_protocol::KeyId) -> Option<u64> {
        if self.behind.is_empty() {
            return None; // nearly always
        }
        self.behind
            .range((*key, 0)..=(*key, u64::MAX))
            .next()
            .map(|(_, s)| *s)
    }

    /// It did not take `msg` (held back): the relay sends that sequence again, and
    /// nothing later of its key id that another subscription could have been sent is
    /// taken before it (see `behind`).
    fn missed(&mut self, msg: &Msg) {
        self.missed_copy(msg, false);
    }

    /// [`LocalSub::missed`]; `sent`: the copy held back was its own (see `sent_back`).
    fn missed_copy(&mut self, msg: &Msg, sent: bool) {
        if msg.seq == 0 {
            return; // unnumbered: never sent again
        }
        let key = (msg.envelope.key_id(), msg.seq);
        let set = if sent {
            &mut self.sent_back
        } else {
            &mut self.behind
        };
        if set.len() >= MAX_GOT && !set.contains(&key) {
            // Bounded: what it awaited is taken as it comes (in order or not, never lost).
            set.clear();
        }
        set.insert(key);
    }

    /// Its connection is gone with copies of its own held back and not come again
    /// (`sent_back`): each key id's resume position goes below the first of them, so the
    /// resume history brings them (and the dedup window drops what it had after them).
    /// Kept lowered — a second cut before they came resumes from there again.
    fn resume_below_sent_back(&mut self) {
        for (key, seq) in std::mem::take(&mut self.sent_back) {
            let pos = self.positions.get(&key).copied().unwrap_or(self.last_seq);
            self.positions.insert(key, pos.min(seq - 1));
        }
    }

    /// It took `msg` (or passed it as a placeholder). A copy of a sequence it awaited:
    /// that one and every lower one of its key id are settled (the relay sends what it
    /// owes in sequence order: a lower one not sent by now is not coming). `own`: only this
    /// subscription could have been sent it, so it is this subscription's own stream, which
    /// has passed every lower sequence as well.
    fn caught(&mut self, msg: &Msg, own: bool) {
        if msg.seq == 0 || self.behind.is_empty() {
            return;
        }
        let k = msg.envelope.key_id();
        let upto = if self.behind.contains(&(k, msg.seq)) {
            msg.seq
        } else if own {
            msg.seq - 1
        } else {
            return;
        };
        let done: Vec<_> = self.behind.range((k, 0)..=(k, upto)).copied().collect();
        for d in done {
            self.behind.remove(&d);
        }
    }

    /// Whether a replayed message with relay sequence `seq` is this subscription's: it is
    /// still in its history (or durable: the relay resumes those from its own position),
    /// and the history it asked for starts at or before `seq`.
    fn wants_history(&self, seq: u64) -> bool {
        (self.opts.durable.is_some() || !self.replaying.is_empty())
            && !matches!(self.opts.replay, Some(frame::Replay::FromSeq(from)) if seq < from)
    }

    /// Whether `msg` is one the relay holds back its own copy of for this subscription,
    /// sent after this subscription's `ReplayDone`: it matches a relay subscription whose
    /// history has not ended (see `held`), above that one's boundary (routed after it
    /// subscribed). That is a live message (naming no subscription, not replayed) that
    /// reached the client for another subscription, and also — whatever its flags — a
    /// message of another subscription's history or retained values (naming that one):
    /// new to the client there, it is still this one's to get (review F2: it was dropped
    /// as a duplicate when its copy came). Not this subscription's own history, nor
    /// history naming none (handed to the subscriptions in history, `wants_history`).
    /// So is a live copy the relay names this subscription paused in (`Msg.paused`,
    /// [`LocalSub::paused_for`]): its own copy follows in its catch-up.
    /// Unnumbered messages are not (their copy could not be told from them), nor any once
    /// `skipped` is full (but those it remembers already).
    fn holds_back(&self, msg: &Msg) -> bool {
        let history = frame::msg_flags::REPLAYED | frame::msg_flags::RETAINED;
        if (self.held.is_empty() && msg.paused.is_none())
            || msg.seq == 0
            || (self.skipped.len() >= MAX_GOT && !self.skipped.contains_key(&msg.seq))
        {
            return false;
        }
        if self.paused_for(msg).is_some() {
            return true;
        }
        if self.held.is_empty() {
            return false;
        }
        match msg.sub_id {
            Some(rid) if self.relay_ids.contains(&rid) => return false,
            Some(_) => {}
            None if msg.flags & history != 0 => return false,
            None => {}
        }
        let path = msg.envelope.token_path();
        self.relay_ids.iter().zip(&self.patterns).any(|(rid, p)| {
            self.held
                .iter()
                .any(|(h, boundary)| h == rid && msg.seq > *boundary)
                && p.matches(&path)
        })
    }
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
    /// Accept history dated before the client's dedup horizon (default false: such
    /// messages are refused, since they could no longer be recognised as replays).
    pub older_history: bool,
    /// Messages this subscription may hold delivered and not yet taken (`None`: the
    /// client's subscription capacity). Beyond it at most once loses new messages
    /// (counted), at least once asks the relay to hold them back (`Sub.credit`).
    pub capacity: Option<u64>,
    /// The tree the subscription is bound to (`None`: the one tree whose held grants
    /// overlap the filter; grants of several trees make the subscribe fail with
    /// [`KeyError::AmbiguousTree`](whispeer_protocol::KeyError::AmbiguousTree) naming
    /// them). Only messages of this tree are delivered to it (PROTOCOL §4.11).
    pub tree: Option<TreeId>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            qos: Qos::AtMostOnce,
            replay: None,
            durable: None,
            retained: true,
            older_history: false,
            capacity: None,
            tree: None,
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
    /// Names a durable subscription. One connection holds a durable name at a time (on a
    /// relay, or across a JetStream cluster); a resume the relay refuses because the name
    /// is still held (the old connection or relay not yet gone) is asked again with the
    /// reconnect backoff until it succeeds.
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }
    /// Whether to receive retained values first.
    pub fn retained(mut self, yes: bool) -> Self {
        self.retained = yes;
        self
    }
    /// Also accept messages dated before the client's dedup horizon (explicitly old
    /// history; they are deduped only while remembered).
    pub fn older_history(mut self, yes: bool) -> Self {
        self.older_history = yes;
        self
    }
    /// This subscription's capacity (at least 1), instead of the client's.
    pub fn capacity(mut self, n: u64) -> Self {
        self.capacity = Some(n.max(1));
        self
    }
    /// Binds the subscription to tree `tree_id` (as [`crate::PublishOptions::tree`] names
    /// the tree to seal with): needed when grants of several trees overlap the filter.
    /// Another tree's messages are never delivered to it, whatever grants arrive later.
    pub fn tree(mut self, tree_id: TreeId) -> Self {
        self.tree = Some(tree_id);
        self
    }
    /// Whether the relay expects acks for this subscription (at least once, or durable).
    pub fn acking(&self) -> bool {
        self.qos != Qos::AtMostOnce || self.durable.is_some()
    }
}

/// What became of one delivered `Msg`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Delivery {
    /// Opened and accepted: hand `msg` to `targets`. `lagged` are at-most-once
    /// subscriptions that matched but had no room (a counted drop, shown as a lag event).
    Deliver {
        /// The message.
        msg: Arc<Received>,
        /// Subscriptions to hand it to (each had room).
        targets: Vec<LocalSubId>,
        /// At-most-once subscriptions that had no room.
        lagged: Vec<LocalSubId>,
        /// Its dedup digest when it is held ([`receive::Guard::hold`]) for the
        /// at-least-once subscriptions among `targets`: the caller says how many hold it
        /// ([`ClientCore::dedup_hold`]), then per holder [`ClientCore::dedup_taken`] or
        /// [`ClientCore::dedup_untaken`].
        held: Option<receive::Digest>,
        /// Its dedup digest, held or not: a durable subscription's copy of a message that
        /// counts as delivered at once (`held` is `None`) is owed to it until it takes it
        /// ([`ClientCore::dedup_co_held`], [`ClientCore::dedup_owe`]).
        digest: Option<receive::Digest>,
    },
    /// Not for the app (did not open, refused, duplicate, no matching subscription): a
    /// placeholder in the ack queue.
    Placeholder,
    /// An at-least-once subscription the relay routed it to (by its routing tokens) had no
    /// room, or awaits an earlier message of its key id that the relay sends it again
    /// (PROTOCOL §3.5.5 "Order"): nothing opened further, delivered or remembered, left
    /// unacknowledged for the relay to deliver again — decided before anything about the
    /// envelope is looked at, so a relay sending beyond the credit learns nothing about
    /// which envelopes open.
    HeldBack,
}

/// Per-topic sealing options with a default. Built with [`SealPolicy::new`] (or
/// `default()`) outside this crate; `per_topic` rules are pushed onto the field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SealPolicy {
    /// Used where no per-topic rule matches.
    pub default: SealOptions,
    /// First matching filter wins.
    pub per_topic: Vec<(TopicFilter, SealOptions)>,
    /// Sign messages with the identity (when one is configured).
    pub sign: bool,
    /// When signing: one signature per batch of publishes (`sig_scheme` 2, PROTOCOL
    /// §4.14) with this window, or `None` for one signature per message (`sig_scheme` 1).
    pub batch: Option<BatchPolicy>,
}

/// The default batch window: up to 256 messages, no added wait — whatever is pending when
/// the connection task runs is signed at once (see [`batching`]), so a gentle publisher's
/// batches stay small and only a busy one fills them. 256 rather than 64 (wave 2 session
/// 22, `whispeer bench --sub-process`, TCP, 1 KiB, unpaced, alternated pairs): the clients'
/// CPU per message was lower in 10 of 11 pairs (e.g. 18.05 vs 19.60, 19.0 vs 22.1 µs) with
/// a third of the signatures, at the cost of 64 more proof bytes per message once a batch
/// holds over 128 (PROTOCOL §4.14); paced runs form small batches either way (p99 0.68–0.88
/// vs 0.62–1.8 ms).
pub const DEFAULT_BATCH: BatchPolicy = BatchPolicy {
    max_messages: 256,
    max_wait_us: 0,
};

impl Default for SealPolicy {
    fn default() -> Self {
        SealPolicy {
            default: SealOptions::default(),
            per_topic: Vec::new(),
            sign: true,
            batch: Some(DEFAULT_BATCH),
        }
    }
}

impl SealPolicy {
    /// `default` for every topic (no per-topic rule yet); `sign`: sign with the identity.
    pub fn new(default: SealOptions, sign: bool) -> Self {
        SealPolicy {
            default,
            per_topic: Vec::new(),
            sign,
            batch: Some(DEFAULT_BATCH),
        }
    }
    /// Whether publishes with `identity` are batch-signed (prepared, then signed by the
    /// engine's seal jobs, [`batching::SealJob`]) rather than sealed whole at once.
    pub fn batches(&self, identity: Option<&Identity>) -> Option<BatchPolicy> {
        match (self.sign, identity) {
            (true, Some(_)) => self.batch,
            _ => None,
        }
    }
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
    seal_publish_in(
        keyring,
        None,
        identity,
        policy,
        sealer,
        topic,
        content_type,
        payload,
        now_ms,
        rng,
    )
}

/// Like [`seal_publish`], sealing with the key of the named tree when `tree` is given
/// ([`Keyring::topic_key_in`]); without it the one tree covering `topic` seals, and grants
/// of two trees covering it are an error naming both ([`Keyring::topic_key`]).
#[allow(clippy::too_many_arguments)]
pub fn seal_publish_in(
    keyring: &RwLock<Keyring>,
    tree: Option<TreeId>,
    identity: Option<&Identity>,
    policy: &SealPolicy,
    sealer: &mut Sealer,
    topic: &Topic,
    content_type: &str,
    payload: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(whispeer_protocol::Envelope, MessageId), PublishError> {
    let key = topic_key(keyring, tree, topic, sealer)?;
    seal_with_key(
        &key,
        identity,
        policy,
        sealer,
        content_type,
        payload,
        now_ms,
        rng,
    )
}

/// [`seal_publish_in`] with the sealing key already looked up ([`Keyring::topic_key`] or
/// [`Keyring::topic_key_in`]): a client that seals many messages to one topic keeps the
/// key rather than deriving it again (a BLAKE3 derivation per topic level).
#[allow(clippy::too_many_arguments)]
pub fn seal_with_key(
    key: &whispeer_protocol::TopicKey,
    identity: Option<&Identity>,
    policy: &SealPolicy,
    sealer: &mut Sealer,
    content_type: &str,
    payload: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(whispeer_protocol::Envelope, MessageId), PublishError> {
    let msg_id = MessageId::random(rng);
    let out = outgoing(payload, content_type, msg_id, now_ms);
    let signer = if policy.sign { identity } else { None };
    let env = sealer.seal(key, &out, &policy.for_topic(key.topic()), signer, rng)?;
    Ok((env, msg_id))
}

/// The first half of a batch-signed publish: like [`seal_publish_in`] up to the signature
/// (key lookup, compression, the §4.8 signature input), leaving signing and sealing to the
/// engine ([`connection::Engine::publish_prepared`]), which cuts the prepared publishes into
/// [`batching::SealJob`]s.
#[allow(clippy::too_many_arguments)]
pub fn prepare_publish_in(
    keyring: &RwLock<Keyring>,
    tree: Option<TreeId>,
    policy: &SealPolicy,
    sealer: &mut Sealer,
    topic: &Topic,
    content_type: &str,
    payload: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(Prepared, MessageId), PublishError> {
    let key = topic_key(keyring, tree, topic, sealer)?;
    prepare_with_key(&key, policy, sealer, content_type, payload, now_ms, rng)
}

/// [`prepare_publish_in`] with the sealing key already looked up (see [`seal_with_key`]).
pub fn prepare_with_key(
    key: &whispeer_protocol::TopicKey,
    policy: &SealPolicy,
    sealer: &mut Sealer,
    content_type: &str,
    payload: &[u8],
    now_ms: u64,
    rng: &mut impl CryptoRngCore,
) -> Result<(Prepared, MessageId), PublishError> {
    let msg_id = MessageId::random(rng);
    let out = outgoing(payload, content_type, msg_id, now_ms);
    let p = sealer.prepare(key, &out, &policy.for_topic(key.topic()))?;
    Ok((p, msg_id))
}

fn outgoing<'a>(
    payload: &'a [u8],
    content_type: &'a str,
    msg_id: MessageId,
    ts_ms: u64,
) -> Outgoing<'a> {
    Outgoing {
        payload,
        content_type,
        msg_id,
        ts_ms,
    }
}

/// The sealing key of `topic` (`Keyring::topic_key`, or `topic_key_in` with a tree),
/// with the derivations `sealer` remembers for the same grant and topic.
fn topic_key(
    keyring: &RwLock<Keyring>,
    tree: Option<TreeId>,
    topic: &Topic,
    sealer: &mut Sealer,
) -> Result<whispeer_protocol::TopicKey, PublishError> {
    let kr = keyring.read().expect("keyring lock");
    Ok(sealer.topic_key(&kr, tree, topic)?)
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
    /// Verified batch roots, shared with open jobs on worker threads ([`jobs::OpenJob`]).
    roots: SharedRoots,
    subs: BTreeMap<LocalSubId, LocalSub>,
    relay_to_local: HashMap<u64, LocalSubId>,
    next_relay_id: u64,
    guard: receive::Guard,
    stats: CoreStats,
    last_seq: u64,
    /// `Sub.credit` of at-least-once subscriptions (their buffer capacity).
    credit: Option<u64>,
    /// Key of the owner secrets sent with durable subscriptions (see [`Self::durable_owner`]).
    owner_key: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// The sequence space the resume positions (`last_seq`) came from (`None`: no
    /// connection yet).
    space: Option<SeqSpace>,
    /// Missing dictionaries already logged (at most [`WARNED_DICTIONARIES`]).
    warned_dictionaries: Vec<whispeer_protocol::DictId>,
    /// Per durable name: messages a subscription of that durable was handed and went away
    /// without taking (their dedup digests) — see [`ClientCore::dedup_untaken`].
    owed: Owed,
    /// By dedup digest: the durable subscriptions in their hand-over (`LocalSub::held`)
    /// still awaiting the relay's own copy of a message new to this client that reached it
    /// for a neighbour meanwhile (their `LocalSub::skipped` holds its digest). They hold no
    /// copy of it, so nothing else says they are owed it: once the window holds it as
    /// delivered (another subscription took it, or it counted as delivered at once) it is
    /// owed to their durables ([`Owed::owe_handed`], saved), and a durable that stops
    /// awaiting it without its copy (unsubscribed, or its `skipped` dropped for another
    /// sequence space) is owed it ([`Owed::owe`]). After a restart before the copy came, the
    /// resumed durable's replayed copy is delivered, not refused as a duplicate (PROTOCOL
    /// §4.11). An entry goes with the copy (delivered to the durable) or the subscription;
    /// bounded by what `skipped` remembers.
    awaited: HashMap<receive::Digest, Vec<LocalSubId>>,
    /// Messages held back from subscriptions that had room for them, until a copy reaches
    /// them or it is known none will ([`withheld`]).
    withheld: withheld::Withheld,
    /// Digests that entered the dedup window on this connection from a resumed
    /// subscription's history (at most [`MAX_GOT`]): the only duplicates another resumed
    /// subscription's history may still show it (`LocalSub::resumed`).
    resume_new: std::collections::HashSet<receive::Digest>,
    /// Acks owed for copies named paused that will not come (`LocalSub::paused_skips`),
    /// for the engine to forgive ([`ClientCore::take_forgiven`]).
    forgiven: Vec<(LocalSubId, u64)>,
    /// Acks to hold for subscriptions whose own copy follows ([`ClientCore::take_owing`]).
    owing: Vec<(LocalSubId, u64)>,
    /// The relay of this connection granted `NAMED_COPIES` (PROTOCOL §3.4.6): a live copy
    /// that names no subscription paused is a copy for every matching subscription it
    /// routed it to ([`ClientCore::relay_features`]).
    named_copies: bool,
    /// The relay of this connection granted `RETAINED_BEFORE` (PROTOCOL §3.4.6): a resume
    /// from a sequence may ask for the retained values older than it too.
    retained_before: bool,
}

/// Whether `msg` is a redelivered copy of the live kind (`REDELIVERED` alone, no `sub_id`):
/// it goes only to the subscriptions that take one ([`LocalSub::takes_redelivered`]).
fn is_redelivery(msg: &Msg) -> bool {
    msg.sub_id.is_none()
        && msg.flags & frame::msg_flags::REDELIVERED != 0
        && msg.flags & (frame::msg_flags::REPLAYED | frame::msg_flags::RETAINED) == 0
}

/// Whether `msg` is a copy a relay sent one subscription alone outside its history: its
/// catch-up after a pause, or live messages it held back during its history (PROTOCOL
/// §3.5.5) — numbered, naming the subscription (`sub_id`), none of `REPLAYED`,
/// `RETAINED`, `REDELIVERED`.
pub(crate) fn is_catch_up(msg: &Msg) -> bool {
    let history =
        frame::msg_flags::REPLAYED | frame::msg_flags::RETAINED | frame::msg_flags::REDELIVERED;
    msg.seq > 0 && msg.sub_id.is_some() && msg.flags & history == 0
}

/// Takes `id` out of `awaited[d]`, dropping the entry once empty.
fn unawait(
    awaited: &mut HashMap<receive::Digest, Vec<LocalSubId>>,
    d: receive::Digest,
    id: LocalSubId,
) {
    if let Some(ids) = awaited.get_mut(&d) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            awaited.remove(&d);
        }
    }
}

/// Most messages [`ClientCore`] keeps owed to durables and not handed to them, all names
/// together (~100 bytes each): past it, a durable is owed nothing more (its resume then
/// treats such a message as a duplicate, as before owed messages existed). Messages owed
/// while a subscription of the durable holds them untaken (`Owed::handed`) are not
/// counted: each is one of that subscription's queued messages, bounded by its capacity.
const MAX_OWED: usize = if cfg!(test) { 64 } else { 65_536 };

type Digests = std::collections::HashSet<receive::Digest>;

/// Messages owed to durables (see [`ClientCore::dedup_untaken`]): a name's set goes
/// when it empties, so a client that owes nothing looks nothing up per message.
///
/// An owed message handed to a subscription of its durable is in `handed` until that
/// subscription takes it: it stays owed in the state file meanwhile (a crash before the
/// take must not lose it), and is journalled as paid only once taken.
#[derive(Debug, Default)]
struct Owed {
    by_name: HashMap<String, Digests>,
    handed: HashMap<String, Digests>,
    /// Entries of `by_name` (held to [`MAX_OWED`]).
    owed_len: usize,
    /// Changes to persist ([`receive::Change::Owed`], `Paid`, `OwedForgotten`).
    journal: Vec<receive::Change>,
}

/// Takes `d` out of `map[name]`, dropping the name's set once empty; whether it was there.
fn take_from(map: &mut HashMap<String, Digests>, name: &str, d: &receive::Digest) -> bool {
    let Some(o) = map.get_mut(name) else {
        return false;
    };
    let had = o.remove(d);
    if o.is_empty() {
        map.remove(name);
    }
    had
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn journal(&mut self, owed: bool, name: &str, d: receive::Digest) {
        let durable = name.to_owned();
        self.journal.push(if owed {
            receive::Change::Owed { durable, digest: d }
        } else {
            receive::Change::Paid { durable, digest: d }
        });
    }

    /// A subscription of `name` went away without taking `d`.
    fn owe(&mut self, name: &str, d: receive::Digest) {
        if take_from(&mut self.handed, name, &d) {
            // Handed and dropped again untaken: owed as before (its record never went),
            // within the bound (past it, the saved record still brings it back to a
            // later process).
            if self.owed_len < MAX_OWED
                && self.by_name.entry(name.to_owned()).or_default().insert(d)
            {
                self.owed_len += 1;
            }
            return;
        }
        if self.owed_len >= MAX_OWED {
            return;
        }
        if self.by_name.entry(name.to_owned()).or_default().insert(d) {
            self.owed_len += 1;
            self.journal(true, name, d);
        }
    }

    /// A saved owed message (not journalled again), loaded within the bound.
    fn restore(&mut self, name: &str, d: receive::Digest) {
        if self.owed_len < MAX_OWED && self.by_name.entry(name.to_owned()).or_default().insert(d) {
            self.owed_len += 1;
        }
    }

    fn contains(&self, name: &str, d: &receive::Digest) -> bool {
        self.by_name.get(name).is_some_and(|o| o.contains(d))
    }

    /// `d` is handed to a subscription of `name` that will take or drop it: taken out of
    /// what is looked up, tracked until [`Owed::paid`]; whether `name` was owed it.
    fn take(&mut self, name: &str, d: &receive::Digest) -> bool {
        let had = take_from(&mut self.by_name, name, d);
        if had {
            self.owed_len -= 1;
            self.handed.entry(name.to_owned()).or_default().insert(*d);
        }
        had
    }

    /// A subscription of `name` holds `d` untaken while the window holds it as delivered
    /// (another subscription took it, or it counted as delivered at once): owed, saved,
    /// and tracked as handed.
    fn owe_handed(&mut self, name: &str, d: receive::Digest) {
        if self.contains(name, &d) {
            return;
        }
        if self.handed.entry(name.to_owned()).or_default().insert(d) {
            self.journal(true, name, d);
        }
    }

    /// `name` got `d` as a placeholder (it did not open): no longer owed (journalled if
    /// it was).
    fn pay(&mut self, name: &str, d: &receive::Digest) {
        if take_from(&mut self.by_name, name, d) {
            self.owed_len -= 1;
            self.journal(false, name, *d);
        } else if take_from(&mut self.handed, name, d) {
            self.journal(false, name, *d);
        }
    }

    /// A subscription of `name` took `d`: if it was owed to it, it is paid (journalled).
    fn paid(&mut self, name: &str, d: &receive::Digest) {
        if !self.handed.is_empty() && take_from(&mut self.handed, name, d) {
            self.journal(false, name, *d);
        }
    }

    fn forget(&mut self, name: &str) {
        self.owed_len -= self.by_name.remove(name).map_or(0, |o| o.len());
        self.handed.remove(name);
        self.journal.push(receive::Change::OwedForgotten {
            durable: name.to_owned(),
        });
    }

    /// Everything owed, handed or not, by name.
    fn snapshot(&self) -> Vec<(String, receive::Digest)> {
        let mut out: Vec<(String, receive::Digest)> = self
            .by_name
            .iter()
            .chain(&self.handed)
            .flat_map(|(n, ds)| ds.iter().map(move |d| (n.clone(), *d)))
            .collect();
        out.sort_unstable();
        out
    }
}

fn owner_secret(
    key: Option<&[u8; 32]>,
    key_id: &whispeer_protocol::KeyId,
    name: &str,
) -> Option<Bytes> {
    let mut h = blake3::Hasher::new_keyed(key?);
    h.update(b"whispeer/v2/durable-owner\0");
    h.update(key_id.as_bytes());
    h.update(name.as_bytes());
    Some(Bytes::copy_from_slice(h.finalize().as_bytes()))
}

impl ClientCore {
    /// A core over a shared keyring.
    pub fn new(keyring: Arc<RwLock<Keyring>>) -> Self {
        Self::with_config(keyring, receive::ReceiveConfig::default())
    }

    /// A core with these receiver limits and policies.
    pub fn with_config(keyring: Arc<RwLock<Keyring>>, cfg: receive::ReceiveConfig) -> Self {
        ClientCore {
            keyring,
            opener: Opener::with_max_payload(cfg.max_payload),
            roots: SharedRoots::new(VerifiedRoots::DEFAULT_CAPACITY),
            subs: BTreeMap::new(),
            relay_to_local: HashMap::new(),
            next_relay_id: 1,
            guard: receive::Guard::new(cfg),
            stats: CoreStats::default(),
            last_seq: 0,
            credit: None,
            owner_key: None,
            space: None,
            warned_dictionaries: Vec::new(),
            owed: Owed::default(),
            awaited: HashMap::new(),
            withheld: withheld::Withheld::default(),
            resume_new: Default::default(),
            forgiven: Vec::new(),
            owing: Vec::new(),
            named_copies: false,
            retained_before: false,
        }
    }

    /// The features the relay of a new connection granted (`Welcome.features`): call
    /// before [`ClientCore::resubscribe_all`].
    pub fn relay_features(&mut self, features: u64) {
        self.named_copies = features & frame::features::NAMED_COPIES != 0;
        self.retained_before = features & frame::features::RETAINED_BEFORE != 0;
    }

    /// Whether the relay sent `msg` for subscription `id` itself (not a neighbour's copy
    /// reaching it, whose own copy the relay still owes it from its store): it names `id`,
    /// it is a redelivery `id` takes, or a live copy the relay sent every matching
    /// subscription it did not name paused (a relay granting `NAMED_COPIES`; otherwise
    /// only when no other subscription could have been sent it). Held back, such a copy
    /// comes again as a redelivery (`LocalSub::sent_back`).
    fn sent_to(&self, id: LocalSubId, msg: &Msg) -> bool {
        let Some(s) = self.subs.get(&id) else {
            return false;
        };
        match msg.sub_id {
            _ if msg.seq == 0 => false,
            Some(rid) => s.relay_ids.contains(&rid),
            None if is_redelivery(msg) => s.takes_redelivered(msg),
            None => live_kind(msg) && (self.named_copies || !self.live_for_another(id, msg)),
        }
    }

    /// A connection opened on a relay of sequence space `space` (call before
    /// [`ClientCore::resubscribe_all`]). When it is not the space the resume positions came
    /// from, they are forgotten: every subscription starts again as first asked (live, plus
    /// the replay its options asked for), and the dedup window drops what was already
    /// delivered. A sequence from another space could skip messages (a resume point past
    /// the new relay's numbers) or replay the wrong ones. Returns whether positions carry
    /// over (true also when there were none).
    pub fn enter_seq_space(&mut self, space: SeqSpace) -> bool {
        let same = self.space.is_none_or(|s| s == space);
        if !same {
            self.last_seq = 0;
            let ids: Vec<LocalSubId> = self.subs.keys().copied().collect();
            for id in ids {
                // What a durable awaited is no longer let past the window by its sequence
                // (the copy's sequence is another space's): owed to it instead.
                self.stop_awaiting(id);
                let s = self.subs.get_mut(&id).expect("listed");
                s.last_seq = 0;
                s.positions.clear();
                s.skipped.clear();
                s.awaiting.clear();
            }
        }
        self.space = Some(space);
        same
    }

    /// The sequence space of the resume positions, once connected.
    pub fn seq_space(&self) -> Option<SeqSpace> {
        self.space
    }

    /// Sets the key durable-subscription owner secrets are derived from. Without one,
    /// durable `Sub`s carry no owner and anyone who learns the key id and the name can take
    /// the durable over on a relay without accounts.
    pub fn set_owner_key(&mut self, key: zeroize::Zeroizing<[u8; 32]>) {
        self.owner_key = Some(key);
    }

    /// The owner secret (`Sub.owner`) of durable `name` under `key_id`:
    /// `BLAKE3-keyed(owner_key, "whispeer/v2/durable-owner" ‖ 0x00 ‖ key_id ‖ name)`.
    /// Only this client (or one holding the same identity) can resume, ack or replace it.
    pub fn durable_owner(&self, key_id: &whispeer_protocol::KeyId, name: &str) -> Option<Bytes> {
        owner_secret(self.owner_key.as_deref(), key_id, name)
    }

    /// The shared keyring.
    pub fn keyring(&self) -> &Arc<RwLock<Keyring>> {
        &self.keyring
    }

    /// Asks the relay for flow control on at-least-once subscriptions: at most `credit`
    /// unacknowledged messages in flight (the subscription's buffer capacity).
    pub fn set_credit(&mut self, credit: Option<u64>) {
        self.credit = credit;
    }

    /// The receiver state (dedup window, retained high-water marks), e.g. to snapshot it.
    pub fn guard(&self) -> &receive::Guard {
        &self.guard
    }

    /// The receiver state (dedup window, retained high-water marks), e.g. to restore it.
    pub fn guard_mut(&mut self) -> &mut receive::Guard {
        &mut self.guard
    }

    /// Whether local subscription `id` expects acks.
    pub fn is_acking(&self, id: LocalSubId) -> bool {
        self.subs.get(&id).is_some_and(|s| s.opts.acking())
    }

    /// The at-least-once subscriptions the relay routed `msg` to, found by matching its
    /// routing tokens (what the relay sees) against their compiled patterns: known even for
    /// an envelope that does not open. Not one whose live messages the relay holds back
    /// while it sends its history (`LocalSub::holds_back`): the message is not its yet,
    /// so it takes no slot there and is not acked for it (PROTOCOL §3.5.5) — an `Ack` frees
    /// a sequence for every subscription of the connection, and one that reached the relay
    /// after the hand-over would free that subscription's own copy before it was taken.
    ///
    /// A history `Msg` naming its subscription (`Msg.sub_id`) is that subscription's alone:
    /// the relay sent it for that one, not for every pattern it matches, so it takes no
    /// slot in a neighbour's queue. Otherwise a neighbour whose app stopped reading held
    /// back its acks (released per subscription in order, `core::acks`) and, under a small
    /// credit, the named subscription's whole replay.
    pub fn route_acking(&self, msg: &Msg) -> Vec<LocalSubId> {
        if let Some(rid) = msg.sub_id {
            return self
                .relay_to_local
                .get(&rid)
                .filter(|id| self.subs.get(id).is_some_and(|s| s.opts.acking()))
                .map(|id| vec![*id])
                .unwrap_or_default();
        }
        self.routed_where(msg, |_, s| s.opts.acking() && !s.holds_back(msg))
    }

    /// The at-least-once subscriptions the relay holds `msg` back for while it sends their
    /// history (`LocalSub::holds_back`): the complement of [`ClientCore::route_acking`]
    /// among the at-least-once ones. Each is owed the relay's own copy of its sequence,
    /// which follows its `ReplayDone`; until it took that copy, the sequence must not be
    /// acked for a neighbour either (PROTOCOL §3.5.5): the relay frees a sequence for
    /// every subscription of the connection, so a neighbour's `Ack` that reached it after
    /// it sent that copy would free the copy before it was taken. Call it before
    /// [`ClientCore::receive_opened`] (which remembers the sequence as skipped).
    pub fn held_back_acking(&self, msg: &Msg) -> Vec<LocalSubId> {
        self.routed_where(msg, |_, s| s.opts.acking() && s.holds_back(msg))
    }

    /// The subscriptions selected by `which` whose compiled token patterns match `msg`'s
    /// routing tokens (key id and tokens): where the relay routed it, known without opening
    /// the envelope. The one matching for acks ([`ClientCore::route_acking`]) and resume
    /// positions alike.
    fn routed_where(
        &self,
        msg: &Msg,
        which: impl Fn(LocalSubId, &LocalSub) -> bool,
    ) -> Vec<LocalSubId> {
        let path = msg.envelope.token_path();
        self.subs
            .iter()
            .filter(|(id, s)| which(**id, s) && s.patterns.iter().any(|p| p.matches(&path)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether any subscription expects acks.
    pub fn any_acking(&self) -> bool {
        self.subs.values().any(|s| s.opts.acking())
    }

    /// The first frame of every connection.
    pub fn hello(client: &str) -> Frame {
        Frame::Hello(Hello {
            versions: vec![frame::PROTOCOL_VERSION],
            features: frame::features::AT_LEAST_ONCE
                | frame::features::EXACTLY_ONCE
                | frame::features::RETAIN
                | frame::features::REPLAY
                | frame::features::DURABLE
                | frame::features::FLOW_CONTROL
                | frame::features::DURABLE_DELETE
                | frame::features::HISTORY_END
                | frame::features::NAMED_COPIES
                | frame::features::RETAINED_BEFORE,
            client: Some(client.to_owned()),
            auth: None,
            account: None,
        })
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        let mut s = self.stats.clone();
        s.refused = self.guard.stats().clone();
        let roots = self.roots.lock();
        s.batch_root_hits = roots.hits();
        s.batch_root_races = roots.raced();
        s
    }

    /// The verified batch roots this core shares with its open jobs.
    pub fn roots(&self) -> &SharedRoots {
        &self.roots
    }

    /// The relay reported dropped messages.
    pub fn on_gap(&mut self, dropped: u64) {
        // The relay's count: never trusted not to overflow.
        self.stats.relay_gaps = self.stats.relay_gaps.saturating_add(dropped);
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
        sub.resume_below_sent_back();
        // Also an at-least-once one that handled nothing yet but knows where its live
        // messages began (a `SubOk.seq` in `positions`): what was stored while it was away
        // is in its resume history. Before, it started live again and lost every stored
        // message published while it was disconnected (found by `tests/mixed_load.rs` with
        // cuts, on a relay whose sequence was still 0). An at-most-once one starts live
        // again until it handled a stored message (with its retained values, if asked).
        // Not one whose own replay has not ended (its `SubOk.seq` is no position): it asks
        // for that replay again.
        let resuming = (sub.last_seq > 0
            || (sub.opts.acking()
                && !sub.positions.is_empty()
                && (sub.held.is_empty() || sub.opts.replay.is_none())))
            && sub.opts.durable.is_none();
        let replay = if resuming {
            // Checked: a relay that sent seq u64::MAX gets asked for it again (dedup drops
            // it), never for everything from 0.
            Some(frame::Replay::FromSeq(sub.last_seq.saturating_add(1)))
        } else {
            sub.opts.replay
        };
        // Cut during its retained values (its hand-over had not ended): it resumes from its
        // position all the same — started live again, as it did before, it lost every
        // message stored meanwhile (found by `tests/mixed_load.rs` on a loaded CI machine,
        // where the hand-over outlasted a publisher's burst) — and, from a relay granting
        // `RETAINED_BEFORE`, gets the retained values older than that first (those it
        // already had are not shown twice: `latest`). From another relay it gets the
        // history alone: stored messages go before retained values.
        let retained_before =
            resuming && !sub.held.is_empty() && sub.asked_retained && self.retained_before;
        // Retained values with a live start; with a replay only as just said (a relay
        // ignores them next to a replay unless granted `RETAINED_BEFORE`, and one granting
        // it would send an explicit replay the values before it too).
        let retained_with = |replay: Option<frame::Replay>| {
            sub.opts.retained
                && match replay {
                    None => true,
                    Some(frame::Replay::FromSeq(_)) => retained_before,
                    Some(_) => false,
                }
        };
        if resuming && sub.got.is_none() {
            // Its resume history holds only messages it did not handle (after its own
            // position), but maybe ones another subscription of this client took since —
            // resuming too, say, whose history came first: to the client-wide dedup window
            // they are duplicates, yet this subscription never saw them. What it gets in its
            // history is counted as an explicit replay's is (`got`), so each of them still
            // reaches it, once (found by `tests/mixed_load.rs`: after a reconnect an
            // at-least-once subscription lost every stored message a neighbour's history
            // delivered first).
            sub.got = Some(Default::default());
            sub.resumed = true;
        }
        // Per pattern: after its own key id's position (see `positions`).
        // A key id without a position of its own: after the last sequence it handled — or,
        // if it handled none, as first asked (never its whole history).
        let asked = sub.opts.replay;
        let replay_for = |sub: &LocalSub, key: &whispeer_protocol::KeyId| match replay {
            Some(frame::Replay::FromSeq(_)) if resuming => match sub.positions.get(key) {
                Some(p) => Some(frame::Replay::FromSeq(p.saturating_add(1))),
                None if sub.last_seq > 0 => {
                    Some(frame::Replay::FromSeq(sub.last_seq.saturating_add(1)))
                }
                None => asked,
            },
            other => other,
        };
        sub.replaying.clear();
        sub.held.clear();
        sub.starts.clear();
        sub.behind.clear();
        // Its relay subscriptions are replaced (their debts forgiven with them); the
        // `skipped` entries stay: its resume history brings those copies.
        sub.paused_skips.clear();
        sub.unnumbered_owed.clear();
        sub.history_debts.clear();
        sub.held_retained.clear();
        for old in sub.relay_ids.drain(..) {
            self.relay_to_local.remove(&old);
        }
        let patterns = {
            let kr = self.keyring.read().expect("keyring lock");
            // Starting in history: the previous epoch too, past its live grace (its messages
            // dated before the rotation cutoff are still accepted from history). Only the
            // subscription's own tree: a grant of another tree never widens it.
            if replay.is_some() {
                kr.compile_history_in(sub.tree, &sub.filter)
            } else {
                kr.compile_in(sub.tree, &sub.filter, now_ms)
            }
        };
        let mut frames = Vec::with_capacity(patterns.len());
        let credit = if sub.opts.acking() {
            sub.opts.capacity.or(self.credit)
        } else {
            None
        };
        sub.patterns = patterns.clone();
        let mut asked_retained = false;
        for pattern in patterns {
            let rid = self.next_relay_id;
            self.next_relay_id += 1;
            sub.relay_ids.push(rid);
            if sub.got.is_some() || replay.is_some() {
                sub.replaying.push(rid);
            }
            self.relay_to_local.insert(rid, id);
            let owner =
                sub.opts.durable.as_deref().and_then(|name| {
                    owner_secret(self.owner_key.as_deref(), pattern.key_id(), name)
                });
            let replay = replay_for(sub, pattern.key_id());
            let retained = retained_with(replay);
            asked_retained |= retained;
            let history_from = match replay {
                _ if sub.opts.durable.is_some() => Some(0),
                Some(frame::Replay::FromSeq(from)) => Some(from),
                Some(_) => Some(0),
                None => None,
            };
            sub.starts.push(Start {
                boundary: None,
                history_from,
            });
            frames.push(Frame::Sub(Sub {
                sub_id: rid,
                pattern,
                qos: sub.opts.qos,
                durable: sub.opts.durable.clone(),
                replay,
                retained,
                credit,
                owner,
            }));
        }
        sub.asked_retained = asked_retained;
        frames
    }

    /// The `Sub` frame of relay subscription `relay_id` again, same id and pattern: a
    /// durable resume the relay refused (its name held elsewhere for now) is asked again.
    /// `None` when it no longer exists or is not durable.
    pub fn resubscribe_durable(&mut self, relay_id: u64) -> Option<Frame> {
        let local = self.relay_to_local.get(&relay_id).copied()?;
        let sub = self.subs.get_mut(&local)?;
        let name = sub.opts.durable.clone()?;
        let i = sub.relay_ids.iter().position(|r| *r == relay_id)?;
        let pattern = sub.patterns.get(i)?.clone();
        let replay = sub.opts.replay;
        if (sub.got.is_some() || replay.is_some()) && !sub.replaying.contains(&relay_id) {
            sub.replaying.push(relay_id);
        }
        let credit = if sub.opts.acking() {
            sub.opts.capacity.or(self.credit)
        } else {
            None
        };
        let owner = owner_secret(self.owner_key.as_deref(), pattern.key_id(), &name);
        Some(Frame::Sub(Sub {
            sub_id: relay_id,
            pattern,
            qos: sub.opts.qos,
            durable: Some(name),
            replay,
            retained: sub.opts.retained,
            credit,
            owner,
        }))
    }

    /// Whether local subscription `id` is durable.
    pub fn is_durable(&self, id: LocalSubId) -> bool {
        self.subs.get(&id).is_some_and(|s| s.opts.durable.is_some())
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

    /// Like [`ClientCore::subscribe`] with replay, durable name, retained and tree options.
    /// The subscription is bound to one tree: the one named (`SubscribeOptions::tree`),
    /// else the one tree whose held grants overlap the filter; grants of several trees are
    /// an error naming them ([`KeyError::AmbiguousTree`](whispeer_protocol::KeyError)),
    /// none is [`SubscribeError::NoKey`].
    pub fn subscribe_with_options(
        &mut self,
        id: LocalSubId,
        filter: TopicFilter,
        opts: SubscribeOptions,
        now_ms: u64,
    ) -> Result<Vec<Frame>, SubscribeError> {
        let no_key = || SubscribeError::NoKey {
            filter: filter.to_string(),
        };
        let tree = match opts.tree {
            Some(t) => t,
            None => {
                let kr = self.keyring.read().expect("keyring lock");
                let history = opts.replay.is_some();
                let trees = kr.subscription_trees(&filter, (!history).then_some(now_ms));
                match trees.as_slice() {
                    [] => return Err(no_key()),
                    [one] => *one,
                    // As for sealing (§4.11): another tree never wins silently, however
                    // its grants came (an invite, a passphrase tree someone else knows).
                    _ => {
                        let names: Vec<String> = trees.iter().map(|t| t.to_string()).collect();
                        return Err(SubscribeError::Key(
                            whispeer_protocol::KeyError::AmbiguousTree {
                                topic: filter.to_string(),
                                trees: names.join(", "),
                            },
                        ));
                    }
                }
            }
        };
        let got = opts.replay.is_some().then(Default::default);
        // A subscription under the same id is replaced: what it awaited is owed to it.
        self.stop_awaiting(id);
        self.subs.insert(
            id,
            LocalSub {
                filter: filter.clone(),
                tree,
                opts,
                relay_ids: Vec::new(),
                starts: Vec::new(),
                behind: Default::default(),
                sent_back: Default::default(),
                held_retained: Default::default(),
                unnumbered: false,
                last_seq: 0,
                positions: HashMap::new(),
                got,
                resumed: false,
                carried: Default::default(),
                replaying: Vec::new(),
                patterns: Vec::new(),
                latest: HashMap::new(),
                latest_full: false,
                held: Vec::new(),
                asked_retained: false,
                skipped: Default::default(),
                awaiting: HashMap::new(),
                paused_skips: Default::default(),
                unnumbered_owed: Default::default(),
                history_debts: Default::default(),
            },
        );
        let frames = self.sub_frames(id, now_ms);
        if frames.is_empty() {
            self.subs.remove(&id);
            return Err(no_key());
        }
        Ok(frames)
    }

    /// The relay ended the history of relay subscription `relay_id` (`ReplayDone` with its
    /// boundary `seq`): live messages follow from there. Returns whether that was a replay
    /// (asked for, or a durable's) rather than only retained values.
    pub fn replay_done(&mut self, relay_id: u64, seq: u64) -> bool {
        let Some(local) = self.relay_to_local.get(&relay_id).copied() else {
            return false;
        };
        let Some(sub) = self.subs.get_mut(&local) else {
            return false;
        };
        let held = sub.held.iter().any(|(r, _)| *r == relay_id);
        let replay = sub.replaying.contains(&relay_id) || sub.opts.durable.is_some();
        sub.held.retain(|(r, _)| *r != relay_id);
        sub.replaying.retain(|r| *r != relay_id);
        if sub.replaying.is_empty() {
            sub.got = None;
            sub.resumed = false;
            sub.carried.clear();
        }
        sub.reached(relay_id, seq);
        // Its history ended: what it was still to bring is not coming.
        self.forgive_history(local, relay_id, u64::MAX);
        replay || !held
    }

    /// The relay confirmed relay subscription `relay_id` (`SubOk` with boundary `seq`).
    /// Without history to come, its live messages follow from `seq`: a resume of it starts
    /// there even if none arrived (messages of its key id numbered below another key id's
    /// latest may still have been on their way). `history` (`SubOk.history`): the relay
    /// holds back its live messages until `ReplayDone` (see `LocalSub::held`).
    pub fn sub_confirmed(&mut self, relay_id: u64, seq: u64, history: bool) {
        let Some(local) = self.relay_to_local.get(&relay_id).copied() else {
            return;
        };
        if let Some(sub) = self.subs.get_mut(&local) {
            if let Some(i) = sub.relay_ids.iter().position(|r| *r == relay_id) {
                if let Some(st) = sub.starts.get_mut(i) {
                    st.boundary = Some(seq);
                }
            }
            if history && !sub.held.iter().any(|(r, _)| *r == relay_id) {
                sub.held.push((relay_id, seq));
            }
            if !sub.replaying.contains(&relay_id) {
                sub.reached(relay_id, seq);
            }
        }
    }

    /// The tree local subscription `id` is bound to.
    pub fn tree_of(&self, id: LocalSubId) -> Option<TreeId> {
        self.subs.get(&id).map(|s| s.tree)
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

    /// Whether a `Gap` for the whole connection (no `sub_id`) may count messages subscription
    /// `id` lost: one that does not acknowledge, or one that was routed an unnumbered
    /// message on this connection (the relay drops those from a full queue whatever the
    /// subscription's QoS). An acknowledging subscription otherwise loses messages only
    /// while paused, which a `Gap` naming it reports.
    pub fn hears_connection_gaps(&self, id: LocalSubId) -> bool {
        self.subs
            .get(&id)
            .is_some_and(|s| !s.opts.acking() || s.unnumbered)
    }

    /// A `Gap` named relay subscription `relay_id` (PROTOCOL §3.3.11 key 2): the relay's
    /// catch-up of what it skipped while that subscription was paused has ended, and it
    /// sent every skipped message its store kept before this `Gap`. What the subscription
    /// still awaits (`LocalSub::behind`) is then not coming — skipped messages the store did
    /// not keep, which the `Gap` counts — so later live copies are no longer held back for
    /// them (without it they were, until the relay redelivered one: an ack timeout).
    /// Only that relay subscription's key id: a subscription spanning epochs has one relay
    /// subscription per key id, and another of them may still be paused.
    pub fn lost_while_paused(&mut self, relay_id: u64) {
        let Some(&id) = self.relay_to_local.get(&relay_id) else {
            return;
        };
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        let key = s
            .relay_ids
            .iter()
            .position(|r| *r == relay_id)
            .and_then(|i| s.patterns.get(i))
            .map(|p| *p.key_id());
        if let Some(key) = key {
            s.behind.retain(|(k, _)| *k != key);
            // What it alone held back from its neighbours is not coming again either.
            self.withheld.cause_done(id, Some(key));
        }
        // Neither are the copies named paused that its catch-up did not send.
        let gone: Vec<u64> = s
            .paused_skips
            .range((relay_id, 0)..=(relay_id, u64::MAX))
            .map(|(_, q)| *q)
            .collect();
        for q in gone {
            self.forgive_paused(id, relay_id, q);
        }
    }

    /// Subscription `id` took (or passed) live copy `msg`, named paused in none of its
    /// relay subscriptions: for the relay subscription of it that matches, every copy
    /// named paused below it is not coming (the catch-up sends in sequence order) — no
    /// longer awaited nor owed; the one at its sequence is this copy (its ack slot pays the
    /// debt).
    fn pause_passed(&mut self, id: LocalSubId, msg: &Msg) {
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        let path = msg.envelope.token_path();
        let Some(rid) = s
            .relay_ids
            .iter()
            .zip(&s.patterns)
            .find(|(r, p)| msg.sub_id.map_or_else(|| p.matches(&path), |n| n == **r))
            .map(|(r, _)| *r)
        else {
            return;
        };
        s.paused_skips.remove(&(rid, msg.seq));
        let gone: Vec<u64> = s
            .paused_skips
            .range((rid, 0)..(rid, msg.seq))
            .map(|(_, q)| *q)
            .collect();
        for q in gone {
            self.forgive_paused(id, rid, q);
        }
    }

    /// A copy subscription `id` was named paused in (relay subscription `rid`, sequence
    /// `seq`) will not come: its `skipped` entry goes, and the ack owed to it is forgiven.
    fn forgive_paused(&mut self, id: LocalSubId, rid: u64, seq: u64) {
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        s.paused_skips.remove(&(rid, seq));
        if let Some(d) = s.forget_skipped(seq) {
            unawait(&mut self.awaited, d, id);
        }
        if s.opts.acking() {
            self.forgiven.push((id, seq));
        }
    }

    /// A copy of `msg` is about to take a slot of the ack queue for the subscription it was
    /// routed to: every other at-least-once subscription whose history (still running,
    /// from at or below its sequence, up to its boundary, not past it yet) will bring its
    /// own copy of that sequence is owed it (`LocalSub::history_debts`), so that this
    /// copy's ack waits for that one. Not one whose own copy was held back already (its
    /// debt stands until the redelivery, `LocalSub::sent_back`).
    fn history_awaits(&mut self, msg: &Msg, routed: &[LocalSubId]) {
        if msg.seq == 0 {
            return;
        }
        let path = msg.envelope.token_path();
        let key = msg.envelope.key_id();
        for (id, s) in self.subs.iter_mut() {
            if s.replaying.is_empty()
                || !s.opts.acking()
                || routed.contains(id)
                || msg.sub_id.is_some_and(|rid| s.relay_ids.contains(&rid))
                || s.sent_back.contains(&(key, msg.seq))
                || s.positions.get(&key).is_some_and(|p| *p >= msg.seq)
                || (s.history_debts.len() >= MAX_GOT)
            {
                continue;
            }
            let awaiting = s
                .relay_ids
                .iter()
                .zip(&s.patterns)
                .zip(&s.starts)
                .find(|((rid, p), st)| {
                    s.replaying.contains(rid)
                        && st.history_from.is_some_and(|f| msg.seq >= f)
                        && st.boundary.is_none_or(|b| msg.seq <= b)
                        && p.matches(&path)
                })
                .map(|((rid, _), _)| *rid);
            if let Some(rid) = awaiting {
                if s.history_debts.insert((rid, msg.seq)) {
                    self.owing.push((*id, msg.seq));
                }
            }
        }
    }

    /// The subscription a copy names (`Msg.sub_id`), if any.
    fn named_local(&self, msg: &Msg) -> Option<LocalSubId> {
        msg.sub_id
            .and_then(|rid| self.relay_to_local.get(&rid))
            .copied()
    }

    /// Subscription `id`'s history copy `msg` (naming its relay subscription) came — taken,
    /// passed or held back: what its history was to bring at that sequence came, and a
    /// lower sequence it was to bring is not coming (a history is sent in order).
    fn history_passed(&mut self, id: LocalSubId, msg: &Msg) {
        let Some(rid) = msg.sub_id else { return };
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        if s.history_debts.is_empty() {
            return;
        }
        s.history_debts.remove(&(rid, msg.seq));
        self.forgive_history(id, rid, msg.seq);
    }

    /// Subscription `id`'s history (relay subscription `rid`) will not bring the sequences
    /// below `below` it was still to bring (`LocalSub::history_debts`): forgiven.
    fn forgive_history(&mut self, id: LocalSubId, rid: u64, below: u64) {
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        let gone: Vec<(u64, u64)> = s
            .history_debts
            .range((rid, 0)..(rid, below))
            .copied()
            .collect();
        for d in &gone {
            s.history_debts.remove(d);
        }
        if s.opts.acking() {
            self.forgiven.extend(gone.iter().map(|(_, q)| (id, *q)));
        }
    }

    /// A catch-up copy (`is_catch_up`) new to this client, with dedup digest `d`: it goes
    /// to the subscription it names alone, and every other subscription it matches is
    /// still to get its own copy at that sequence, if the relay had it paused too — that
    /// copy then passes the dedup window, once (its `skipped` entry, spent when a copy of
    /// the message reaches it). One that had the message got it before this copy (its live
    /// copy was queued when the message was routed, before any catch-up read it), so it
    /// gets no exception: the message was not new to the client then. Found by
    /// `tests/mixed_load.rs`: two subscriptions paused together, the second catch-up's
    /// copy was a duplicate, lost to its subscription.
    fn neighbours_await(&mut self, msg: &Msg, d: receive::Digest) {
        let path = msg.envelope.token_path();
        for (id, s) in self.subs.iter_mut() {
            if msg.sub_id.is_some_and(|rid| s.relay_ids.contains(&rid))
                || s.holds_back(msg)
                || (s.skipped.len() >= MAX_GOT && !s.skipped.contains_key(&msg.seq))
            {
                continue; // its own, or held back for its hand-over (handled there)
            }
            // A relay subscription of it that was there when the message was routed.
            let Some(rid) = s
                .relay_ids
                .iter()
                .zip(&s.patterns)
                .zip(&s.starts)
                .find(|((_, p), st)| st.boundary.is_some_and(|b| msg.seq > b) && p.matches(&path))
                .map(|((r, _), _)| *r)
            else {
                continue;
            };
            s.skipped.entry(msg.seq).or_insert(None);
            s.await_copy(msg.seq, d);
            if s.opts.acking() {
                // Its copy follows in its own catch-up, in order: owed (the sequence is not
                // acked before it took that copy — an `Ack` frees a sequence for every
                // subscription of the connection), settled like a copy named paused.
                s.paused_skips.insert((rid, msg.seq));
                self.owing.push((*id, msg.seq));
            }
        }
    }

    /// Acks to hold for subscriptions whose own copy of a sequence follows
    /// (`neighbours_await`), since the last call: the engine owes each before it takes the
    /// message's slot.
    pub fn take_owing(&mut self) -> Vec<(LocalSubId, u64)> {
        std::mem::take(&mut self.owing)
    }

    /// Acks owed to subscriptions for copies named paused that will not come (see
    /// `LocalSub::paused_skips`), since the last call: the engine forgives each debt.
    pub fn take_forgiven(&mut self) -> Vec<(LocalSubId, u64)> {
        std::mem::take(&mut self.forgiven)
    }

    /// Subscriptions that lost messages held back from them for another subscription
    /// (its room or its order) that will not come again (`withheld`): (subscription, how
    /// many) since the last call. The engine reports them as it reports messages dropped
    /// for want of room.
    pub fn take_withheld_lost(&mut self) -> Vec<(LocalSubId, u64)> {
        if !self.withheld.has_lost() {
            return Vec::new();
        }
        let lost = self.withheld.take_lost();
        self.stats.withheld_lost += lost.iter().map(|(_, n)| n).sum::<u64>();
        lost
    }

    /// The connection ended: what was held back on it does not come again on it (see
    /// [`ClientCore::take_withheld_lost`]).
    pub fn connection_lost(&mut self) {
        for (id, d) in self.withheld.connection_lost() {
            if let Some(s) = self.subs.get_mut(&id) {
                if s.carried.len() < MAX_GOT {
                    s.carried.insert(d);
                }
            }
        }
        // What entered the window from a resumed history on this connection is still owed
        // to a resumed subscription whose own history had not reached it: its next resume
        // brings it again (found by `tests/mixed_load.rs` with two reconnects: a slow
        // history lost what a neighbour's faster one delivered before the second cut).
        // Its `got` (kept while its history runs) stops what it did get.
        if !self.resume_new.is_empty() {
            for s in self.subs.values_mut() {
                if s.resumed && s.got.is_some() {
                    for d in &self.resume_new {
                        if s.carried.len() >= MAX_GOT {
                            break;
                        }
                        s.carried.insert(*d);
                    }
                }
            }
        }
        self.resume_new.clear();
    }

    /// Drops a subscription; returns the `Unsub` frames.
    pub fn unsubscribe(&mut self, id: LocalSubId) -> Vec<Frame> {
        self.stop_awaiting(id);
        self.withheld.forget(id);
        let Some(sub) = self.subs.remove(&id) else {
            return Vec::new();
        };
        sub.relay_ids
            .into_iter()
            .map(|rid| {
                self.relay_to_local.remove(&rid);
                Frame::Unsub(Unsub {
                    sub_id: rid,
                    delete: None,
                })
            })
            .collect()
    }

    /// After a reconnect (or a key change): `Sub` frames for every subscription, recompiled
    /// against the keyring as it is now (new epochs included).
    pub fn resubscribe_all(&mut self, now_ms: u64) -> Vec<Frame> {
        for s in self.subs.values_mut() {
            s.unnumbered = false; // per connection
        }
        let ids: Vec<LocalSubId> = self.subs.keys().copied().collect();
        ids.into_iter()
            .flat_map(|id| self.sub_frames(id, now_ms))
            .collect()
    }

    /// Opens a delivered message once and returns it with every local subscription of its
    /// tree whose filter matches its topic. A message that does not open, is refused or is a duplicate
    /// yields nothing (and is counted). Every subscription is assumed to have room.
    pub fn receive(&mut self, msg: &Msg, now_ms: u64) -> Option<(Arc<Received>, Vec<LocalSubId>)> {
        match self.receive_with(msg, now_ms, &|_| true) {
            Delivery::Deliver {
                msg, targets, held, ..
            } => {
                if let Some(d) = held {
                    self.dedup_hold(d, 0); // nothing tracks takes here: delivered
                }
                Some((msg, targets))
            }
            _ => None,
        }
    }

    /// Opens a delivered message once, runs the receiver checks and decides its fate.
    /// `room(sub)` says whether a subscription can take one more message now: an
    /// at-least-once one the relay routed the message to without room holds the whole
    /// message back (unacknowledged, not remembered, so the relay's redelivery is
    /// accepted), whatever the envelope holds; an at-most-once one without room loses it
    /// (reported in `lagged`). A `Delivery::Deliver` with `held` set MUST be followed by
    /// [`ClientCore::dedup_hold`] (then per holder [`ClientCore::dedup_taken`] or
    /// [`ClientCore::dedup_untaken`]): until then the message is neither persisted as seen
    /// nor forgotten ([`ClientCore::receive`] settles it at once).
    pub fn receive_with(
        &mut self,
        msg: &Msg,
        now_ms: u64,
        room: &dyn Fn(LocalSubId) -> bool,
    ) -> Delivery {
        let opened = self.open(msg, now_ms);
        self.receive_opened(msg, opened, now_ms, room)
    }

    /// Opens a delivered message here (the first half of [`ClientCore::receive_with`]):
    /// authenticates it and leaves its payload compressed — [`ClientCore::receive_opened`]
    /// decompresses it once the receiver checks passed, only for a message it delivers. A
    /// [`jobs::OpenJob`] does the same on another thread.
    pub fn open(&mut self, msg: &Msg, now_ms: u64) -> Result<Unsealed, OpenError> {
        let kr = self.keyring.read().expect("keyring lock");
        let live = jobs::is_live(msg.flags);
        self.opener
            .authenticate_shared(&kr, &msg.envelope, now_ms, live, &self.roots)
            .map(Unsealed::new)
    }

    /// The cap on a delivered message's decompressed payload
    /// ([`receive::ReceiveConfig::max_payload`]).
    pub fn max_payload(&self) -> usize {
        self.guard.config().max_payload
    }

    /// The second half of [`ClientCore::receive_with`]: the receiver checks and the fate of
    /// a message opened already (here, or by a [`jobs::OpenJob`]), in relay order. The
    /// payload is decompressed last, and only for a message that is delivered: a
    /// duplicate or refused one costs no decompression.
    ///
    /// Nothing the relay can observe depends on whether the envelope opened (PROTOCOL
    /// §4.10): the subscriptions concerned are those the relay routed it to, found by its
    /// routing tokens ([`ClientCore::route_acking`]'s matching); the message is held back
    /// when an at-least-once one of them has no room, and otherwise their resume positions
    /// move past it whatever became of it (delivered, duplicate, refused or unopenable), so
    /// neither the acks nor the `Replay::FromSeq` of a later resubscribe tell the relay
    /// which envelopes this client could open.
    pub fn receive_opened(
        &mut self,
        msg: &Msg,
        opened: Result<Unsealed, OpenError>,
        now_ms: u64,
        room: &dyn Fn(LocalSubId) -> bool,
    ) -> Delivery {
        self.guard.expire(now_ms);
        if opened.as_ref().is_ok_and(Unsealed::decompressed) {
            self.stats.decompressed += 1; // by the open job
        }
        let routed = self.routed(msg);
        if msg.seq == 0 {
            for id in &routed {
                if let Some(s) = self.subs.get_mut(id) {
                    s.unnumbered = true;
                }
            }
        }
        {
            // Not theirs yet: the relay's copy follows their history (`LocalSub::held`).
            // Remembered at first sight, whatever becomes of it: what bounds the acks owed
            // to them (`LocalSub::skipped`); its digest only once it proves new.
            let held: Vec<LocalSubId> = self
                .subs
                .iter()
                .filter(|(_, s)| s.holds_back(msg))
                .map(|(id, _)| *id)
                .collect();
            let mut named_paused = false;
            for id in held {
                if let Some(s) = self.subs.get_mut(&id) {
                    s.skipped.entry(msg.seq).or_insert(None);
                    let paused = s.paused_for(msg);
                    if paused.is_some() {
                        named_paused = true;
                    }
                    match paused {
                        // Paused at the relay: the relay names it in every copy it sends
                        // for a neighbour until its catch-up ends, which sends its own in
                        // order — nothing to hold back later copies for.
                        Some(rid) => {
                            s.paused_skips.insert((rid, msg.seq));
                        }
                        // And it awaits that copy before later live ones
                        // (`LocalSub::behind`): the relay's hand-over may go on past
                        // `ReplayDone` (sent in steps, or from its store once the
                        // held-back messages spilled there), while a neighbour's live
                        // copies keep coming.
                        None if s.opts.acking() => s.missed(msg),
                        None => {}
                    }
                }
            }
            if named_paused {
                self.stats.named_paused += 1;
            }
        }
        // Order (PROTOCOL §3.5.5): one that awaits an earlier sequence the relay sends it
        // again does not take a later live copy another subscription could have been sent.
        // The at-least-once subscriptions it is held back for (no room, or awaiting an
        // earlier sequence); none nearly always (no allocation then).
        let mut no_room = false;
        let mut causes: Vec<LocalSubId> = Vec::new();
        for id in &routed {
            // An unnumbered message (sequence 0: live-only with the cluster's JetStream
            // store) is never held back for want of room: nothing would send it again (the
            // relay tracks nothing for it), so holding it back only lost it for every
            // subscription it was routed to. One without room passes it as a drop instead,
            // told like an at-most-once subscription's (`deliver`'s `lagged`).
            let full = msg.seq > 0 && self.subs[id].opts.acking() && !room(*id);
            if full || self.waits_for_earlier(*id, msg) {
                no_room |= full;
                causes.push(*id);
            }
        }
        if !causes.is_empty() {
            if no_room {
                self.stats.held_back += 1;
            } else {
                self.stats.held_for_order += 1;
            }
            // Denied to the others with it: lost to them unless a copy comes again
            // (`withheld`). Only while no subscription was handed it yet: once one was,
            // those routed it then got it or were told of its loss, and a later copy held
            // back again (a redelivery, say) takes nothing from them — tracked as denied,
            // they would be shown it twice (found by `tests/mixed_load.rs`).
            let digest = opened.as_ref().ok().map(|u| {
                let a = u.authentic();
                u.keys
                    .unwrap_or_else(|| {
                        receive::keys_of(&a.tree_id, a.sender.as_ref(), &a.msg_id.0, &a.topic)
                    })
                    .0
            });
            let first = digest.is_some_and(|d| !self.guard.is_seen_digest(d));
            // The causes that never had it: all of them at its first sight; later, one
            // whose own history copy this is and whose history did not bring it yet (a
            // neighbour's history copy delivered it first) — its redelivery, a duplicate
            // by then, is still its own (found by `tests/mixed_load.rs` with reconnects).
            let owed: Vec<LocalSubId> = match &opened {
                Ok(_) if first => causes.clone(),
                Ok(u) => {
                    let a = u.authentic();
                    let key = receive::key_of(a.tree_id, a.sender.as_ref(), a.msg_id.0);
                    causes
                        .iter()
                        .copied()
                        .filter(|id| {
                            let s = &self.subs[id];
                            msg.sub_id.is_some_and(|rid| s.relay_ids.contains(&rid))
                                && s.got.as_ref().is_some_and(|g| !g.contains(&key))
                                // As for its history copies that are duplicates: a
                                // resumed one is owed only what is new on this connection.
                                && (!s.resumed
                                    || digest.is_some_and(|d| {
                                        self.resume_new.contains(&d) || s.carried.contains(&d)
                                    }))
                        })
                        .collect()
                }
                Err(_) => Vec::new(),
            };
            // Those the relay sent this copy for (their own, `sent_to`): decided once.
            let sent_ids: Vec<LocalSubId> = routed
                .iter()
                .copied()
                .filter(|id| self.sent_to(*id, msg))
                .collect();
            let sent: Vec<LocalSubId> = causes
                .iter()
                .copied()
                .filter(|id| sent_ids.contains(id))
                .collect();
            let subs = &self.subs;
            let denied = routed
                .iter()
                .filter(|id| first && !causes.contains(id))
                .map(|id| (*id, subs[id].opts.acking()));
            self.withheld.hold(
                msg.seq,
                msg.envelope.key_id(),
                digest,
                withheld::HeldFor {
                    causes: &causes,
                    owed: &owed,
                    sent: &sent,
                },
                denied,
            );
            // Not taken by any of them: each awaits it again, before later ones.
            for id in &routed {
                let sent = sent_ids.contains(id);
                if let Some(s) = self.subs.get_mut(id).filter(|s| s.opts.acking()) {
                    s.missed_copy(msg, sent);
                    // A copy it was named paused in came (its catch-up's), to come again as
                    // a redelivery: no longer one the `Gap` ending its catch-up forgives —
                    // its dedup exception (`skipped`) stays for that copy (found by
                    // `tests/mixed_load.rs` with cuts: forgiven, the copy its resume
                    // history brought was dropped as a duplicate).
                    if let Some(rid) = msg.sub_id.filter(|_| sent) {
                        s.paused_skips.remove(&(rid, msg.seq));
                    }
                }
            }
            // Its own retained value: the relay's redelivered copy of it is its own.
            if msg.flags & frame::msg_flags::RETAINED != 0 && msg.seq > 0 {
                if let Some(s) = msg
                    .sub_id
                    .and_then(|rid| self.relay_to_local.get(&rid))
                    .and_then(|id| self.subs.get_mut(id))
                {
                    if s.held_retained.len() < MAX_GOT {
                        s.held_retained.insert(msg.seq);
                    }
                }
            }
            if let Some(id) = self.named_local(msg) {
                self.history_passed(id, msg);
            }
            return Delivery::HeldBack;
        }
        let delivery = self.deliver(msg, opened, now_ms, room);
        if let Some(id) = self.named_local(msg) {
            self.history_passed(id, msg);
        }
        // Its slot's ack waits for the copies other histories still bring.
        if routed
            .iter()
            .any(|id| self.subs.get(id).is_some_and(|s| s.opts.acking()))
        {
            self.history_awaits(msg, &routed);
        }
        if !self.withheld.is_empty() {
            // Handed to (or told lost to): `got`. A copy for: those it was routed to, but a
            // redelivered copy only those that acknowledge and take one (as `deliver`
            // decides).
            let got: Vec<LocalSubId> = match &delivery {
                Delivery::Deliver {
                    targets, lagged, ..
                } => targets.iter().chain(lagged).copied().collect(),
                _ => Vec::new(),
            };
            let redelivery = is_redelivery(msg);
            let eligible: Vec<LocalSubId> = routed
                .iter()
                .copied()
                .filter(|id| {
                    !redelivery
                        || self
                            .subs
                            .get(id)
                            .is_some_and(|s| s.opts.acking() && s.takes_redelivered(msg))
                })
                .collect();
            self.withheld.handled(msg.seq, &got, &eligible);
        }
        // Taken (or passed) by the at-least-once ones: what they awaited up to it came.
        for id in &routed {
            if let Some(s) = self.subs.get_mut(id).filter(|s| !s.sent_back.is_empty()) {
                // Its own copy held back came again (`sent_back`).
                s.sent_back.remove(&(msg.envelope.key_id(), msg.seq));
            }
            let Some(s) = self.subs.get(id) else { continue };
            if s.behind.is_empty()
                || !s.opts.acking()
                || s.first_behind(&msg.envelope.key_id()).is_none()
            {
                continue;
            }
            let own = match msg.sub_id {
                Some(rid) => s.relay_ids.contains(&rid),
                None => live_kind(msg) && !self.live_for_another(*id, msg),
            };
            if let Some(s) = self.subs.get_mut(id) {
                s.caught(msg, own);
            }
        }
        // A copy of the live kind a relay subscription of theirs took — unnamed, or naming
        // it (its catch-up's) — after copies naming it paused: its catch-up (in sequence
        // order) is past what it skipped below this one.
        if live_kind(msg) || is_catch_up(msg) {
            for id in &routed {
                if self
                    .subs
                    .get(id)
                    .is_some_and(|s| !s.paused_skips.is_empty())
                {
                    self.pause_passed(*id, msg);
                }
            }
        }
        // A redelivered copy handled (delivered or not): no longer awaited.
        if msg.flags & frame::msg_flags::REDELIVERED != 0 && msg.seq > 0 {
            for id in &routed {
                if let Some(s) = self.subs.get_mut(id) {
                    s.held_retained.remove(&msg.seq);
                }
            }
        }
        self.advance(msg.seq, msg.envelope.key_id(), &routed);
        delivery
    }

    /// Counts an envelope that did not open (or whose payload did not decompress).
    fn not_opened(&mut self, e: &OpenError) {
        if let Some(id) = e.missing_dictionary() {
            // Authentic (decrypted and verified) but compressed with a dictionary this
            // client lacks: say which, so the user can import it — once per dictionary (a
            // member could name a new random id in every message).
            self.stats.missing_dictionary += 1;
            let new = !self.warned_dictionaries.contains(&id);
            if new && self.warned_dictionaries.len() < WARNED_DICTIONARIES {
                self.warned_dictionaries.push(id);
                tracing::warn!(dictionary = %id, "{e} (logged once per dictionary)");
            } else {
                tracing::debug!(dictionary = %id, "{e}");
            }
        }
        self.stats.rejected += 1;
    }

    /// Whether `msg` is addressed to subscription `id` at all: a message naming a relay
    /// subscription (`Msg.sub_id`: history, retained values) only to the one it names
    /// (nowhere if that one is gone); an unnamed `REPLAYED` one only to subscriptions still
    /// in their history; an unnamed live one not to a subscription whose live messages the
    /// relay holds back ([`LocalSub::holds_back`]). Known without opening the envelope.
    fn addressed_to(&self, msg: &Msg, id: LocalSubId, s: &LocalSub) -> bool {
        match msg.sub_id {
            Some(rid) => self.relay_to_local.get(&rid) == Some(&id),
            None if msg.flags & frame::msg_flags::REPLAYED != 0 => s.wants_history(msg.seq),
            None => !s.holds_back(msg),
        }
    }

    /// Whether another subscription of this connection could have been sent `msg` live: a
    /// relay subscription of another local subscription whose pattern matches it,
    /// confirmed with a boundary (`SubOk.seq`) below its sequence and not in its hand-over
    /// (until its `ReplayDone` the relay holds its live messages back). Only then can a
    /// live `Msg` matching `id` reach this client while the relay has `id`'s delivery
    /// paused (PROTOCOL §3.5.5 "Order"); otherwise the relay sent it for `id`.
    fn live_for_another(&self, id: LocalSubId, msg: &Msg) -> bool {
        let path = msg.envelope.token_path();
        self.subs.iter().any(|(other, s)| {
            *other != id
                && s.relay_ids
                    .iter()
                    .zip(&s.patterns)
                    .zip(&s.starts)
                    .any(|((rid, p), st)| {
                        st.boundary.is_some_and(|b| msg.seq > b)
                            && !s.held.iter().any(|(h, _)| h == rid)
                            && p.matches(&path)
                    })
        })
    }

    /// Whether at-least-once subscription `id` must not take `msg` now (PROTOCOL §3.5.5
    /// "Order"): it awaits an earlier sequence of its key id that the relay sends it again
    /// (`LocalSub::behind`), and `msg` is a live-kind `Msg` above it, not itself one it
    /// awaits, that another subscription could have been sent
    /// ([`ClientCore::live_for_another`]) — the relay may have this subscription paused,
    /// sending it that message later from its store, in order. History naming it and
    /// redelivered copies are not held for this: the first is its own stream, in order;
    /// the second a copy of one it awaits or already took.
    fn waits_for_earlier(&self, id: LocalSubId, msg: &Msg) -> bool {
        let Some(s) = self.subs.get(&id) else {
            return false;
        };
        if s.behind.is_empty() || !s.opts.acking() || !live_kind(msg) {
            return false;
        }
        let key = msg.envelope.key_id();
        s.first_behind(&key)
            .is_some_and(|first| msg.seq > first && !s.behind.contains(&(key, msg.seq)))
            && self.live_for_another(id, msg)
    }

    /// The subscriptions the relay routed `msg` to (by its routing tokens, see
    /// [`ClientCore::routed_where`]) that it is addressed to ([`ClientCore::addressed_to`]):
    /// whose positions it moves and whose room decides whether it is held back.
    fn routed(&self, msg: &Msg) -> Vec<LocalSubId> {
        self.routed_where(msg, |id, s| self.addressed_to(msg, id, s))
    }

    /// The decision of [`ClientCore::receive_opened`] for a message not held back.
    fn deliver(
        &mut self,
        msg: &Msg,
        opened: Result<Unsealed, OpenError>,
        now_ms: u64,
        room: &dyn Fn(LocalSubId) -> bool,
    ) -> Delivery {
        let u = match opened {
            Ok(u) => u,
            Err(e) => {
                self.not_opened(&e);
                return Delivery::Placeholder;
            }
        };
        let a = u.authentic();
        // History goes only to the subscription it is for: a live subscription, or one
        // whose history ended, never receives another's replay, and one that asked for
        // history from sequence `n` gets nothing before `n`.
        // A relay names the subscription of a history message (`Msg.sub_id`); from one
        // that does not, a replayed message goes to the subscriptions still in history.
        let replayed = msg.flags & frame::msg_flags::REPLAYED != 0;
        // A redelivered copy goes only to the subscriptions it may be of (a live-only one
        // gets none from before it started). Still routed to the others, so each passes it
        // as a placeholder and acks it as before (PROTOCOL §3.5.5 "Redelivered copies").
        let redelivery = is_redelivery(msg);
        let matched: Vec<LocalSubId> = self
            .subs
            .iter()
            // Its own tree only (§4.11): a message another tree's key opened is never one of
            // this subscription's, whatever its topic — another tree's admin could
            // otherwise write into it.
            .filter(|(id, s)| {
                s.tree == a.tree_id
                    && s.filter.matches(&a.topic)
                    && self.addressed_to(msg, **id, s)
                    && (!redelivery || s.takes_redelivered(msg))
            })
            .map(|(id, _)| *id)
            .collect();
        if matched.is_empty() {
            return Delivery::Placeholder;
        }
        // The relay's flags (outside the seal) lift the live checks (skew, epoch grace) and
        // the dedup window's hold on retained values: each counts only for a subscription
        // that asked for what it claims — history for `REPLAYED`, retained values for
        // `RETAINED`, acknowledgements for `REDELIVERED`. For any other the message is
        // refused like a live one too old or too late (and takes its place in the acks).
        let retained = msg.flags & frame::msg_flags::RETAINED != 0 && !replayed;
        let claims = |s: &LocalSub| {
            (!replayed || s.wants_history(msg.seq))
                && (!retained || s.opts.retained)
                && (msg.flags & frame::msg_flags::REDELIVERED == 0 || s.opts.acking())
        };
        let entitled: Vec<LocalSubId> = matched
            .iter()
            .copied()
            .filter(|id| claims(&self.subs[id]))
            .collect();
        if entitled.is_empty() {
            self.stats.rejected += 1;
            return Delivery::Placeholder;
        }
        let allow_old = entitled.iter().any(|id| self.subs[id].opts.older_history);
        // Digest and retained key: from the open job, or hashed here (inline opening).
        let keys = u.keys.unwrap_or_else(|| {
            receive::keys_of(&a.tree_id, a.sender.as_ref(), &a.msg_id.0, &a.topic)
        });
        let cand = receive::Candidate {
            tree: a.tree_id,
            topic: &a.topic,
            sender: a.sender,
            msg_id: a.msg_id.0,
            ts_ms: a.ts_ms,
            flags: msg.flags,
            allow_old,
            keys: Some(keys),
        };
        let key = receive::dedup_key(&cand);
        // A duplicate's (topic, message) pair as `LocalSub::latest` holds them (a new
        // message's comes from its `Accepted`).
        let mut dup_pair = None;
        // A duplicate's digest (delivered to a durable it is owed to: no longer owed).
        let mut dup_digest = None;
        let (accepted, mut eligible) = match self.guard.check(&cand, now_ms) {
            Ok(a) => {
                // New to this client from a resumed subscription's history: another
                // resumed subscription's history copy of it is still its own.
                if replayed && self.resume_new.len() < MAX_GOT {
                    let resumed = msg
                        .sub_id
                        .and_then(|rid| self.relay_to_local.get(&rid))
                        .and_then(|id| self.subs.get(id))
                        .is_some_and(|s| s.resumed);
                    if resumed {
                        self.resume_new.insert(keys.0);
                    }
                }
                // New to this client, and not theirs yet: the relay's copy follows their
                // history (`LocalSub::held`), and only that message's copy is let past
                // the dedup window (`LocalSub::skipped`).
                let held: Vec<LocalSubId> = self
                    .subs
                    .iter()
                    .filter(|(_, s)| s.holds_back(msg))
                    .map(|(id, _)| *id)
                    .collect();
                for id in held {
                    if let Some(s) = self.subs.get_mut(&id) {
                        // A durable awaits it with no copy: owed once delivered.
                        if s.await_copy(msg.seq, keys.0) && s.opts.durable.is_some() {
                            self.awaited.entry(keys.0).or_default().push(id);
                        }
                    }
                }
                if is_catch_up(msg) {
                    self.neighbours_await(msg, keys.0);
                }
                // Unnumbered, in a copy named for another subscription: each other one
                // matching it gets its own copy too (`LocalSub::unnumbered_owed`).
                let history = frame::msg_flags::REPLAYED | frame::msg_flags::RETAINED;
                if let (0, Some(rid), 0) = (msg.seq, msg.sub_id, msg.flags & history) {
                    for s in self.subs.values_mut() {
                        if !s.relay_ids.contains(&rid)
                            && s.tree == cand.tree
                            && s.filter.matches(cand.topic)
                            && s.unnumbered_owed.len() < MAX_GOT
                        {
                            s.unnumbered_owed.insert(keys.0);
                        }
                    }
                }
                (Some(a), entitled.clone())
            }
            Err(why @ (receive::Refusal::Duplicate | receive::Refusal::BeforeWindow)) => {
                // Already delivered (or dated before what a dedup window shortened by its
                // capacity still covers, so perhaps delivered): only history a subscription
                // asked for (replayed, and not yet seen by that subscription) may still go
                // to it, and a topic's current value (retained, and not older than anything
                // accepted for the topic: the guard checked) to a subscription that did not
                // get it last on that topic (`LocalSub::latest`).
                let (dig, rk) = keys;
                let pair = latest_pair(rk, dig);
                dup_pair = Some(pair);
                dup_digest = Some(dig);
                let pair = retained.then_some(pair);
                let asked: Vec<LocalSubId> = entitled
                    .iter()
                    .copied()
                    .filter(|id| {
                        let s = &self.subs[id];
                        // Held back from it (for another subscription, or for itself
                        // before it ever had it), and another subscription has taken it
                        // since: it never saw this message (`withheld`; found by
                        // `tests/mixed_load.rs`: a QoS 0 neighbour's catch-up copy of a
                        // stored message was a duplicate, lost silently).
                        if self.withheld.is_owed(msg.seq, *id, dig) {
                            return true;
                        }
                        match pair {
                            Some((t, d)) => {
                                why == receive::Refusal::Duplicate
                                    && !s.latest_full
                                    && s.latest.get(&t) != Some(&d)
                            }
                            None => {
                                (replayed
                                    && s.got
                                        .as_ref()
                                        .is_some_and(|g| g.len() < MAX_GOT && !g.contains(&key))
                                    && (!s.resumed
                                        || self.resume_new.contains(&dig)
                                        || s.carried.contains(&dig)))
                                    || (msg.seq > 0 && s.skipped.get(&msg.seq) == Some(&Some(dig)))
                                    || (msg.seq == 0 && s.unnumbered_owed.contains(&dig))
                                    || (replayed
                                        && s.opts
                                            .durable
                                            .as_ref()
                                            .is_some_and(|n| self.owed.contains(n, &dig)))
                            }
                        }
                    })
                    .collect();
                if asked.is_empty() {
                    if why == receive::Refusal::Duplicate {
                        self.stats.duplicates += 1;
                    }
                    return Delivery::Placeholder;
                }
                if msg.seq == 0 {
                    for id in &asked {
                        if let Some(s) = self.subs.get_mut(id) {
                            s.unnumbered_owed.remove(&dig);
                        }
                    }
                }
                (None, asked)
            }
            Err(_) => return Delivery::Placeholder,
        };
        if a.content_type == CLEAR_RETAINED {
            // A retained value's clear: accepted (its date moves the retained mark, its id
            // is remembered), never handed to the application (nor decompressed).
            if let Some(a) = accepted {
                self.guard.commit(a);
            }
            return Delivery::Placeholder;
        }
        // Older than what the dedup window covers (the horizon, or a window shortened by
        // its capacity: retained values are held to the horizon only): only for
        // subscriptions that asked for older history.
        let start = if accepted.is_none_or(|a| a.released()) || retained {
            // History a subscription asked for is deduplicated by what that subscription
            // got; retained values by their high-water mark; a released held message (the
            // window's start passed it while it waited untaken) by the guard's exception.
            now_ms.saturating_sub(self.guard.config().horizon_ms)
        } else {
            self.guard.window_start_ms(now_ms)
        };
        if a.ts_ms < start {
            eligible.retain(|id| self.subs[id].opts.older_history);
        }
        let (targets, lagged): (Vec<LocalSubId>, Vec<LocalSubId>) =
            eligible.into_iter().partition(|id| room(*id));
        // Its digest, for what durables are owed.
        let delivered = dup_digest.or(accepted.map(|a| a.digest()));
        if targets.is_empty() && lagged.is_empty() {
            if let Some(a) = accepted {
                self.guard.commit(a);
            }
            return Delivery::Placeholder;
        }
        // Decompressed only now, for a message delivered (an open job may have done it
        // already, for a payload within a small multiple of its envelope).
        if !u.decompressed() {
            self.stats.decompressed += 1;
        }
        let max = self.max_payload();
        let opened = {
            let kr = self.keyring.read().expect("keyring lock");
            u.open(&mut self.opener, &kr, max)
        };
        let o = match opened {
            Ok(o) => o,
            Err(e) => {
                // Authentic, but its payload is over the cap or does not decompress: its
                // id is remembered (not its date), so a replay of it is a duplicate and
                // costs no decompression again — unless a dictionary was missing, which the
                // user may still import.
                if let (Some(a), None) = (accepted, e.missing_dictionary()) {
                    self.guard.remember(a);
                }
                // A durable it was owed to gets the placeholder in its place: paid.
                self.hand_owed(delivered, &targets, false);
                self.not_opened(&e);
                return Delivery::Placeholder;
            }
        };
        // Handed to an at-least-once subscription: held until one of them takes it
        // (`Guard::hold`), so one that goes away untaken leaves the relay's redelivery to be
        // accepted again — at least once across an unsubscribe, a close or a crash.
        // An at-most-once subscription among them counts as delivery at once: it took the
        // message (its queue), and a copy re-posted later must stay a duplicate for it.
        let acking = msg.seq > 0
            && targets.iter().any(|id| self.subs[id].opts.acking())
            && targets.iter().all(|id| self.subs[id].opts.acking());
        // Handed to a durable it was owed to (as a duplicate, or accepted again after every
        // holder let it go): tracked until that durable takes it (`held` below, or the
        // engine's own tracking of a copy delivered at once), so the durable going away
        // without taking it owes it again.
        // (A relay's unstored copy, sequence 0, gets no slot to take: paid.)
        let owed_handed = self.hand_owed(delivered, &targets, msg.seq > 0);
        // Delivered for good here (taken by an at-most-once subscription): owed to the
        // durables that await their own copy of it (`awaited`), once theirs are settled.
        let mut delivered_now = None;
        let held = match accepted {
            Some(a) if acking => {
                let d = a.digest();
                self.guard.hold(a);
                Some(d)
            }
            Some(a) => {
                delivered_now = Some(a.digest());
                self.guard.commit(a);
                None
            }
            // A held message's copy (history a subscription asked for) held by more; or one
            // owed to a durable, tracked until that durable takes it (the guard holds
            // nothing for it: taking or releasing it there changes nothing).
            None => {
                let d = keys.0;
                // A held message's copy (its retained value, say) handed to an at-most-once
                // subscription: delivered for good at once, as a new message would be
                // (`commit` above). Left held, nothing was journalled: after a crash the
                // saved mark was older than what the app saw, and an older retained value
                // was accepted (a rollback) and the message shown again.
                if targets.iter().any(|id| !self.subs[id].opts.acking()) && self.guard.is_held(d) {
                    self.guard.settle(d);
                    delivered_now = Some(d);
                }
                Some(d).filter(|d| acking && (owed_handed || self.guard.is_held(*d)))
            }
        };
        for id in targets.iter().chain(&lagged) {
            if let Some(s) = self.subs.get_mut(id) {
                // Its awaited copy came, or another copy of the message: no longer awaited.
                for d in s.copy_came(msg.seq, keys.0).into_iter().flatten() {
                    unawait(&mut self.awaited, d, *id);
                }
            }
        }
        if let Some(d) = delivered_now {
            self.owe_awaited(d, None);
        }
        for id in &targets {
            if let Some(s) = self.subs.get_mut(id) {
                if let Some(g) = s.got.as_mut() {
                    if g.len() < MAX_GOT {
                        g.insert(key);
                    }
                }
            }
        }
        // What each subscription that asked for retained values got last on this topic.
        let pair = accepted
            .map(|acc| latest_pair(acc.retained_key(), acc.digest()))
            .or(dup_pair);
        if let Some((t, d)) = pair.filter(|_| targets.iter().any(|id| self.subs[id].opts.retained))
        {
            for id in &targets {
                if let Some(s) = self.subs.get_mut(id) {
                    if !s.opts.retained || s.latest_full {
                        continue;
                    }
                    if s.latest.len() < MAX_SHOWN || s.latest.contains_key(&t) {
                        s.latest.insert(t, d);
                    } else {
                        s.latest_full = true;
                    }
                }
            }
        }
        if !targets.is_empty() {
            self.stats.delivered += 1;
        }
        Delivery::Deliver {
            msg: Arc::new(self.received(o, msg)),
            targets,
            lagged,
            held,
            digest: delivered,
        }
    }

    fn received(&self, o: whispeer_protocol::Opened, msg: &Msg) -> Received {
        Received::from_opened(o, msg.seq, msg.flags & frame::msg_flags::RETAINED != 0)
    }

    /// Moves the resume points past a handled (delivered or placeholder) sequence of an
    /// envelope of key id `key`: the connection's, and those of the subscriptions the relay
    /// routed it to (`subs`), whatever became of it.
    fn advance(&mut self, seq: u64, key: whispeer_protocol::KeyId, subs: &[LocalSubId]) {
        if seq == 0 {
            return; // not stored: nothing to resume from
        }
        self.last_seq = self.last_seq.max(seq);
        for id in subs {
            if let Some(s) = self.subs.get_mut(id) {
                s.last_seq = s.last_seq.max(seq);
                let pos = s.positions.entry(key).or_insert(0);
                *pos = (*pos).max(seq);
            }
        }
    }

    /// `n` at-least-once subscriptions hold the delivered message `d` untaken
    /// ([`Delivery::Deliver`]`::held`); with none, it counts as delivered at once.
    pub fn dedup_hold(&mut self, d: receive::Digest, n: usize) {
        // Hot path (every message an at-least-once subscription gets): the hand-over
        // bookkeeping only when some durable awaits a copy.
        if self.awaited.is_empty() {
            self.guard.hold_by(d, n);
            return;
        }
        let held = self.guard.is_held(d);
        self.guard.hold_by(d, n);
        if held && !self.guard.is_held(d) {
            self.owe_awaited(d, None); // none holds it: delivered at once
        }
    }

    /// A subscription (of durable `durable`, if it has one) took held message `d`:
    /// delivered for good (persisted), and no longer owed to that durable.
    pub fn dedup_taken(&mut self, d: receive::Digest, durable: Option<&str>) {
        self.guard.settle(d);
        if let Some(name) = durable {
            self.owed.paid(name, &d);
        }
        self.owe_awaited(d, durable);
    }

    /// Message `d` is delivered for good (taken by a subscription of durable `taker`, if
    /// it has one, or delivered at once): each durable of another name whose subscription
    /// still awaits the relay's own copy of it in its hand-over (`awaited`) is owed it —
    /// saved, tracked as handed until it takes that copy. A durable that took it itself
    /// (another copy: its retained value, say) awaits it no more.
    fn owe_awaited(&mut self, d: receive::Digest, taker: Option<&str>) {
        if self.awaited.is_empty() {
            return; // nearly always: no durable is in a hand-over awaiting a copy
        }
        let Some(ids) = self.awaited.get_mut(&d) else {
            return;
        };
        let (subs, owed) = (&self.subs, &mut self.owed);
        ids.retain(|id| {
            let Some(n) = subs.get(id).and_then(|s| s.opts.durable.as_deref()) else {
                return false;
            };
            if Some(n) == taker {
                return false;
            }
            owed.owe_handed(n, d);
            true
        });
        if ids.is_empty() {
            self.awaited.remove(&d);
        }
    }

    /// Subscription `id` stops awaiting the copies its `skipped` remembers (it goes, or
    /// forgets them): a durable one is owed each message it still awaited (`awaited`) —
    /// owed already if the window holds it as delivered (`owe_awaited`), and so too if
    /// that happens later (another subscription still holds it untaken) or never (a
    /// message the window does not hold is accepted again anyway; a saved record goes
    /// once the window forgot it, `restore_owed`).
    fn stop_awaiting(&mut self, id: LocalSubId) {
        let Some(s) = self.subs.get(&id) else {
            return;
        };
        let Some(name) = s.opts.durable.as_deref() else {
            return;
        };
        for d in s.skipped.values().flatten() {
            if self.awaited.get(d).is_some_and(|ids| ids.contains(&id)) {
                unawait(&mut self.awaited, *d, id);
                self.owed.owe(name, *d);
            }
        }
    }

    pub fn dedup_untaken(&mut self, d: receive::Digest, durable: Option<&str>) {
        self.guard.release(d);
        if let Some(name) = durable {
            self.owed.owe(name, d);
        }
    }

    /// Message `d` (if any) is handed to `targets`: for each durable among them it was
    /// owed to, tracked as handed until that durable's subscription takes it (`tracked`),
    /// or else paid now. Whether any was. Nothing is looked up while nothing is owed.
    fn hand_owed(
        &mut self,
        d: Option<receive::Digest>,
        targets: &[LocalSubId],
        tracked: bool,
    ) -> bool {
        let mut handed = false;
        if let Some(d) = d.filter(|_| !self.owed.is_empty()) {
            for id in targets {
                // (A durable subscription always acks: its copy has a slot to take.)
                if let Some(n) = &self.subs[id].opts.durable {
                    if tracked {
                        handed |= self.owed.take(n, &d);
                    } else {
                        self.owed.pay(n, &d);
                    }
                }
            }
        }
        handed
    }

    /// A subscription of durable `durable` went away without taking its copy of message
    /// `d`, a copy that was not held (it counted as delivered at once): owed to it.
    pub fn dedup_owe(&mut self, d: receive::Digest, durable: &str) {
        self.owed.owe(durable, d);
    }

    /// A subscription of durable `durable` holds message `d` untaken while the window
    /// holds it as delivered (saved) — another subscription took a copy, or it counted as
    /// delivered at once — so it is owed to that durable: saved too, so a crash before
    /// the durable takes it does not lose it (its redelivery would be a duplicate), and
    /// tracked as handed to it.
    pub fn dedup_co_held(&mut self, d: receive::Digest, durable: &str) {
        self.owed.owe_handed(durable, d);
    }

    /// Durable `name` is deleted: it is owed nothing any more.
    pub fn forget_owed(&mut self, name: &str) {
        self.owed.forget(name);
    }

    /// Loads a saved owed message (call after the dedup window is restored) while the
    /// window remembers `d` (once it forgot it, the relay's redelivery is taken or
    /// refused by its date like any other message), within the bound on owed messages in
    /// memory. Whether its saved record stays: `false` once the window forgot it (a state
    /// file deletes it); one past the bound stays saved (a later process may load it).
    pub fn restore_owed(&mut self, durable: &str, d: receive::Digest) -> bool {
        if !self.guard.remembers(d) {
            return false;
        }
        self.owed.restore(durable, d);
        true
    }

    /// Every message owed to a durable now, by durable name (for a state snapshot).
    pub fn owed_snapshot(&self) -> Vec<(String, receive::Digest)> {
        self.owed.snapshot()
    }

    /// Changes to the receiver state to persist (dedup entries, retained high-water marks,
    /// messages owed to durables).
    pub fn take_changes(&mut self) -> Vec<receive::Change> {
        let mut c = self.guard.take_changes();
        c.append(&mut self.owed.journal);
        c
    }

    /// Forgets the receiver state changes since the last call (nothing is persisted).
    pub fn clear_changes(&mut self) {
        self.guard.clear_changes();
        self.owed.journal.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use whispeer_protocol::{Scope, TreeKey};

    /// The relay's flags sit outside the seal: `RETAINED`, `REDELIVERED` and `REPLAYED`
    /// lift checks only for subscriptions that asked for retained values, acknowledgements
    /// or history; a delivered message flagged `RETAINED` is shown again once per
    /// subscription at most (the current value to a new subscription), and never one older
    /// than what was accepted for its topic.
    #[test]
    fn relay_flags_count_only_for_subscriptions_that_asked_for_them() {
        use frame::msg_flags::{REDELIVERED, REPLAYED, RETAINED};
        let (kr, mut rng) = one_tree(7);
        let mut core = ClientCore::new(kr.clone());
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let o = SubscribeOptions::new;
        core.subscribe_with_options(1, f("a/#"), o(), 0).unwrap();
        core.subscribe_with_options(2, f("a/#"), o().retained(false), 0)
            .unwrap();
        core.subscribe_with_options(3, f("a/#"), o().qos(Qos::AtLeastOnce), 0)
            .unwrap();
        const NOW: u64 = 1_800_000_000_000;
        let mut seal_on = |topic: &str, ts: u64| {
            seal_publish(
                &kr,
                None,
                &SealPolicy::default(),
                &mut Sealer::new(),
                &Topic::new(topic).unwrap(),
                CBOR,
                b"\x01",
                ts,
                &mut rng,
            )
            .unwrap()
            .0
        };
        let (m, stale) = (seal_on("a/x", NOW - 1_000), seal_on("a/x", NOW - 3_600_000));
        let (live, newer) = (seal_on("a/x", NOW - 500), seal_on("a/x", NOW - 400));
        let (other, newest) = (seal_on("a/y", NOW - 300), seal_on("a/x", NOW - 200));
        let msg = |env: &whispeer_protocol::Envelope, seq, flags, sub_id| Msg {
            paused: None,
            sub_id,
            seq,
            envelope: env.clone(),
            flags,
        };
        let to = |core: &mut ClientCore, m: Msg| {
            core.receive(&m, NOW).map(|(_, mut t)| {
                t.sort();
                t
            })
        };
        let rid = |core: &ClientCore, id| Some(core.relay_ids(id)[0]);
        // The topic's current value goes to the subscriptions that asked for retained
        // values; named for the one that asked for none, it is refused.
        let r2 = rid(&core, 2);
        assert_eq!(to(&mut core, msg(&m, 10, RETAINED, r2)), None);
        let r1 = rid(&core, 1);
        assert_eq!(to(&mut core, msg(&m, 10, RETAINED, r1)), Some(vec![1]));
        // Unnamed (an older relay): to each subscription that asks for retained values
        // and did not get it.
        assert_eq!(to(&mut core, msg(&m, 10, RETAINED, None)), Some(vec![3]));
        for _ in 0..3 {
            assert_eq!(to(&mut core, msg(&m, 10, RETAINED, r1)), None);
            assert_eq!(to(&mut core, msg(&m, 10, RETAINED, None)), None);
        }
        // A message delivered live is never shown again, flagged retained, to a
        // subscription that got it.
        assert_eq!(to(&mut core, msg(&live, 12, 0, None)), Some(vec![1, 2, 3]));
        assert_eq!(to(&mut core, msg(&live, 12, RETAINED, r1)), None);
        assert_eq!(to(&mut core, msg(&live, 12, RETAINED, None)), None);
        // Nor to a new subscription that got it live before its retained values came
        // (a relay delaying its SubOk).
        core.subscribe_with_options(4, f("a/x"), o(), NOW).unwrap();
        let r4 = rid(&core, 4);
        assert_eq!(
            to(&mut core, msg(&newer, 13, 0, None)),
            Some(vec![1, 2, 3, 4])
        );
        assert_eq!(to(&mut core, msg(&newer, 13, RETAINED, r4)), None);
        // A new subscription that did not get it: the topic's current value once, never
        // an older one.
        core.subscribe_with_options(5, f("a/#"), o(), NOW).unwrap();
        let r5 = rid(&core, 5);
        assert_eq!(to(&mut core, msg(&m, 10, RETAINED, r5)), None, "rollback");
        assert_eq!(to(&mut core, msg(&newer, 13, RETAINED, r5)), Some(vec![5]));
        assert_eq!(to(&mut core, msg(&newer, 13, RETAINED, r5)), None);
        assert_eq!(core.guard().stats().retained_rollback, 1);
        // Nor again after subscribing anew (a reconnect; a durable expired meanwhile).
        let _ = core.resubscribe_all(NOW);
        let r5 = rid(&core, 5);
        assert_eq!(
            to(&mut core, msg(&newer, 13, RETAINED, r5)),
            None,
            "shown to this subscription already"
        );
        // Live messages of another subscription before a subscription's retained values
        // (the relay holds live messages back per subscription) do not cost it the
        // retained values of other topics.
        core.subscribe_with_options(6, f("a/#"), o(), NOW).unwrap();
        let r6 = rid(&core, 6);
        assert_eq!(
            to(&mut core, msg(&newest, 15, 0, None)),
            Some(vec![1, 2, 3, 4, 5, 6])
        );
        assert_eq!(to(&mut core, msg(&other, 14, RETAINED, r6)), Some(vec![6]));
        // An hour old: refused live; flagged redelivered it goes to the acking
        // subscription only; flagged replayed and named for a live one, nowhere. Named by
        // relay ids they hold now: an id from before the resubscribe above names nothing
        // (the message would go nowhere whatever its flags), and the resubscribed ones
        // resume in history, so the live one is 6.
        let r2 = rid(&core, 2);
        assert_eq!(core.local_for(r2.unwrap()), Some(2));
        assert_eq!(core.local_for(r6.unwrap()), Some(6));
        assert_eq!(to(&mut core, msg(&stale, 11, 0, None)), None);
        assert_eq!(to(&mut core, msg(&stale, 11, REPLAYED, r6)), None);
        assert_eq!(to(&mut core, msg(&stale, 11, REDELIVERED, r2)), None);
        // (Redelivered at or below a subscription's boundary, or before its `SubOk`, it
        // would be history: not a live-only subscription's, §3.3.7. Confirmed at 15, a
        // copy above it is a live one of its.)
        core.sub_confirmed(rid(&core, 3).unwrap(), 15, false);
        assert_eq!(
            to(&mut core, msg(&stale, 16, REDELIVERED, None)),
            Some(vec![3])
        );
    }

    /// Review of session 28, F3: a topic's retained high-water mark was compared by date
    /// and id only. Mallory (who can write `a/x`) signs her own message with the date and
    /// id of Alice's, the topic's newest; flagged retained for a new subscription it passed
    /// as a duplicate of the mark and was shown as the topic's value (delivered without
    /// entering the dedup window, so its replayed copy was delivered again). Now the mark
    /// is the message's dedup identity (tree, sender, id): her copy is refused as no newer
    /// than the mark; her message replayed is history like any other of hers — her sender
    /// and content, once.
    #[test]
    fn another_members_copy_of_the_marks_date_and_id_is_not_the_retained_value() {
        use frame::msg_flags::{REPLAYED, RETAINED};
        let (kr, mut rng) = one_tree(28);
        let (alice, mallory) = (
            Identity::generate_with(&mut rng),
            Identity::generate_with(&mut rng),
        );
        let mut core = ClientCore::new(kr.clone());
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe_with_options(1, f("a/#"), SubscribeOptions::new(), 0)
            .unwrap();
        const NOW: u64 = 1_800_000_000_000;
        let topic = Topic::new("a/x").unwrap();
        let ts = NOW - 1_000;
        let (alices, id) = seal_publish(
            &kr,
            Some(&alice),
            &SealPolicy::default(),
            &mut Sealer::new(),
            &topic,
            CBOR,
            b"\x01",
            ts,
            &mut rng,
        )
        .unwrap();
        let mut sealer = Sealer::new();
        let key = sealer.topic_key(&kr.read().unwrap(), None, &topic).unwrap();
        let forged = sealer
            .seal(
                &key,
                &outgoing(b"\x02", CBOR, id, ts),
                &SealOptions::default(),
                Some(&mallory),
                &mut rng,
            )
            .unwrap();
        let msg = |env: &whispeer_protocol::Envelope, seq, flags, sub_id| Msg {
            paused: None,
            sub_id,
            seq,
            envelope: env.clone(),
            flags,
        };
        let got = core.receive(&msg(&alices, 10, 0, None), NOW).unwrap();
        assert_eq!((got.1, got.0.sender), (vec![1], Some(alice.sender_id())));
        // A new subscription asking for retained values and history.
        let opts = SubscribeOptions::new()
            .retained(true)
            .replay(frame::Replay::FromSeq(1));
        core.subscribe_with_options(2, f("a/#"), opts, NOW).unwrap();
        let r2 = Some(core.relay_ids(2)[0]);
        let before = core.stats().duplicates;
        assert!(
            core.receive(&msg(&forged, 11, RETAINED, r2), NOW).is_none(),
            "Mallory's copy of the mark's date and id is not the topic's value"
        );
        assert_eq!(core.guard().stats().retained_rollback, 1);
        assert_eq!(core.stats().duplicates, before, "refused, not a duplicate");
        assert!(core.receive(&msg(&forged, 11, RETAINED, r2), NOW).is_none());
        assert!(core
            .receive(&msg(&forged, 11, RETAINED, None), NOW)
            .is_none());
        // Replayed: her own message (not Alice's, not a retained value), once.
        let (m, to) = core.receive(&msg(&forged, 11, REPLAYED, r2), NOW).unwrap();
        assert_eq!(to, vec![2]);
        assert_eq!(m.sender, Some(mallory.sender_id()));
        assert_eq!((&m.payload[..], m.retained), (&b"\x02"[..], false));
        assert!(core.receive(&msg(&forged, 11, REPLAYED, r2), NOW).is_none());
        assert!(core.receive(&msg(&forged, 11, RETAINED, r2), NOW).is_none());
        // Alice's message is still the topic's value: shown to the new subscription once.
        let (m, to) = core.receive(&msg(&alices, 10, RETAINED, r2), NOW).unwrap();
        assert_eq!((to, m.sender), (vec![2], Some(alice.sender_id())));
        assert!(core.receive(&msg(&alices, 10, RETAINED, r2), NOW).is_none());
    }

    /// A subscription in its history remembers what it received so that history another
    /// subscription delivered is still its own to see, once; a relay that never ends the
    /// history (no `ReplayDone`) must not make that grow with every message: past its bound
    /// nothing more is remembered, and a replayed duplicate is refused rather than shown
    /// twice.
    #[test]
    fn what_a_subscription_in_history_remembers_is_bounded() {
        use frame::msg_flags::REPLAYED;
        let (kr, mut rng) = one_tree(11);
        let mut core = ClientCore::new(kr.clone());
        const NOW: u64 = 1_800_000_000_000;
        let opts = SubscribeOptions::new().replay(frame::Replay::FromSeq(1));
        core.subscribe_with_options(1, TopicFilter::new("h/#").unwrap(), opts, NOW)
            .unwrap();
        let topic = Topic::new("h/x").unwrap();
        let envs: Vec<_> = (0..MAX_GOT as u64 + 8)
            .map(|i| {
                seal_publish(
                    &kr,
                    None,
                    &SealPolicy::default(),
                    &mut Sealer::new(),
                    &topic,
                    CBOR,
                    b"\x01",
                    NOW - 1_000 - i,
                    &mut rng,
                )
                .unwrap()
                .0
            })
            .collect();
        let msg = |i: usize| Msg {
            paused: None,
            sub_id: None,
            seq: i as u64 + 1,
            envelope: envs[i].clone(),
            flags: REPLAYED,
        };
        for i in 0..envs.len() {
            assert!(core.receive(&msg(i), NOW).is_some(), "history #{i}");
        }
        assert_eq!(core.subs[&1].got.as_ref().map(|g| g.len()), Some(MAX_GOT));
        // Replayed again: the first (remembered) and the last (past the bound) alike are
        // refused — never delivered twice.
        assert!(core.receive(&msg(0), NOW).is_none());
        assert!(core.receive(&msg(envs.len() - 1), NOW).is_none());
    }

    #[test]
    fn open_once_deliver_to_matching_dedup() {
        let (kr, mut rng) = one_tree(1);
        let id = Identity::generate_with(&mut rng);
        let mut core = ClientCore::new(kr.clone());
        assert!(
            core.enter_seq_space(SeqSpace::Named([1; 16])),
            "no positions yet"
        );
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
            paused: None,
            sub_id: None,
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
        // (Only on a relay of the same sequence space.)
        let subs = |core: &mut ClientCore| {
            let mut r: Vec<(u64, Option<frame::Replay>, bool)> = core
                .resubscribe_all(0)
                .into_iter()
                .map(|f| match f {
                    Frame::Sub(s) => (core.local_for(s.sub_id).unwrap(), s.replay, s.retained),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            r.sort_by_key(|r| r.0);
            r
        };
        assert!(core.enter_seq_space(SeqSpace::Named([1; 16])));
        use frame::Replay::FromSeq;
        assert_eq!(
            subs(&mut core),
            vec![
                (1, Some(FromSeq(10)), false),
                (2, Some(FromSeq(10)), false),
                (3, None, true)
            ]
        );
        // Another space (failover to a relay of another store): sequence 9 means nothing
        // there, so every subscription starts again as first asked.
        assert!(!core.enter_seq_space(SeqSpace::Named([2; 16])));
        let fresh = vec![(1, None, true), (2, None, true), (3, None, true)];
        assert_eq!(subs(&mut core), fresh);
        assert_eq!(core.last_seq(), 0);
        // A relay naming no space is known by its address only.
        assert!(!core.enter_seq_space(SeqSpace::Unnamed(0)));
        assert!(core.enter_seq_space(SeqSpace::Unnamed(0)));
        assert!(!core.enter_seq_space(SeqSpace::Unnamed(1)));
        assert_eq!(core.unsubscribe(1).len(), 1);
    }

    /// A subscription spanning two key ids (here two epochs of its tree, after a rotation)
    /// resumes each pattern after its own key id's position: the relay orders messages per
    /// key id only, so a message of epoch 0 numbered 11 may still be on its way when epoch
    /// 1's 12 arrived — resuming both from 13 would lose it.
    #[test]
    fn each_key_id_resumes_from_its_own_position() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut kr = Keyring::new();
        let first = TreeKey::generate_with("t", &mut rng).unwrap();
        let next = first.rotate(1_000, &mut rng).unwrap();
        let trees = [first, next];
        for tk in &trees {
            kr.add_tree_key_at(tk, 0).unwrap();
        }
        let kr = Arc::new(RwLock::new(kr));
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let frames = core
            .subscribe(1, TopicFilter::new("a/#").unwrap(), Qos::AtLeastOnce, 0)
            .unwrap();
        assert_eq!(frames.len(), 2, "one pattern per epoch");
        for f in &frames {
            let Frame::Sub(s) = f else { panic!("{f:?}") };
            core.sub_confirmed(s.sub_id, 5, false);
        }
        // Epoch 1's message 12 arrives; epoch 0's 11 does not (the connection drops).
        let seal = |tree: &TreeKey, rng: &mut rand_chacha::ChaCha20Rng| {
            let mut one = Keyring::new();
            one.add_tree_key_at(tree, 0).unwrap();
            seal_publish(
                &RwLock::new(one),
                None,
                &SealPolicy::default(),
                &mut Sealer::new(),
                &Topic::new("a/x").unwrap(),
                CBOR,
                b"\x01",
                5,
                rng,
            )
            .unwrap()
            .0
        };
        let env = seal(&trees[1], &mut rng);
        let later_key = env.key_id();
        let msg = Msg {
            paused: None,
            sub_id: None,
            seq: 12,
            envelope: env,
            flags: 0,
        };
        assert!(core.receive(&msg, 0).is_some());
        assert!(core.enter_seq_space(SeqSpace::Named([1; 16])));
        let mut resumed: Vec<(bool, Option<frame::Replay>)> = core
            .resubscribe_all(0)
            .into_iter()
            .map(|f| match f {
                Frame::Sub(s) => (*s.pattern.key_id() == later_key, s.replay),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        resumed.sort_by_key(|r| r.0);
        use frame::Replay::FromSeq;
        assert_eq!(
            resumed,
            vec![(false, Some(FromSeq(6))), (true, Some(FromSeq(13)))],
            "epoch 0 from its SubOk boundary, epoch 1 after its message"
        );
    }

    /// Review finding: a member can name a new random dictionary in every message; each is
    /// counted, but only the first few missing dictionaries are logged (once each).
    #[test]
    fn missing_dictionaries_are_counted_and_logged_once_each_up_to_a_bound() {
        let (recv_kr, mut rng) = one_tree(11);
        // The sender holds the same tree and 20 dictionaries the receiver lacks.
        let (send_kr, _) = one_tree(11);
        let ids: Vec<_> = (0..20u8)
            .map(|i| {
                let d = whispeer_protocol::Dictionary::new(vec![i; 64]).unwrap();
                let id = d.id();
                send_kr.write().unwrap().add_dictionary(d);
                id
            })
            .collect();
        let mut core = ClientCore::new(recv_kr);
        core.subscribe_with_options(
            1,
            TopicFilter::new("a/#").unwrap(),
            SubscribeOptions::new(),
            0,
        )
        .unwrap();
        let topic = Topic::new("a/x").unwrap();
        for (n, id) in ids.iter().chain(ids.iter()).enumerate() {
            let mut policy = SealPolicy::default();
            policy.default.compression = whispeer_protocol::Compression::ZstdDict {
                level: 3,
                dict: *id,
            };
            let env = seal_publish(
                &send_kr,
                None,
                &policy,
                &mut Sealer::new(),
                &topic,
                OCTETS,
                &[7u8; 200],
                NOW,
                &mut rng,
            )
            .unwrap()
            .0;
            assert!(core.receive(&at(&env, n as u64 + 1), NOW).is_none());
        }
        assert_eq!(core.stats().missing_dictionary, 40);
        assert_eq!(core.stats().rejected, 40);
        assert_eq!(
            core.warned_dictionaries,
            ids[..WARNED_DICTIONARIES],
            "the first 16 distinct ones logged, once each"
        );
    }

    const NOW: u64 = 1_800_000_000_000;

    /// A keyring holding one fresh tree `t` (as a client shares it), and the rng seeded `seed`
    /// it was generated with.
    fn one_tree(seed: u64) -> (Arc<RwLock<Keyring>>, rand_chacha::ChaCha20Rng) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let tk = TreeKey::generate_with("t", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        (Arc::new(RwLock::new(kr)), rng)
    }

    fn sealed(
        kr: &RwLock<Keyring>,
        rng: &mut rand_chacha::ChaCha20Rng,
        topic: &str,
        payload: &[u8],
    ) -> whispeer_protocol::Envelope {
        seal_publish(
            kr,
            None,
            &SealPolicy::default(),
            &mut Sealer::new(),
            &Topic::new(topic).unwrap(),
            OCTETS,
            payload,
            NOW,
            rng,
        )
        .unwrap()
        .0
    }

    fn at(env: &whispeer_protocol::Envelope, seq: u64) -> Msg {
        Msg {
            paused: None,
            sub_id: None,
            seq,
            envelope: env.clone(),
            flags: 0,
        }
    }

    /// A core with durable subscription 1 (`a/#`, at least once, durable "d").
    fn durable_core(kr: &Arc<RwLock<Keyring>>, cfg: receive::ReceiveConfig) -> ClientCore {
        let mut core = ClientCore::with_config(kr.clone(), cfg);
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let opts = SubscribeOptions::new().qos(Qos::AtLeastOnce).durable("d");
        core.subscribe_with_options(1, TopicFilter::new("a/#").unwrap(), opts, NOW)
            .unwrap();
        core
    }

    /// Delivers `m` at `seq` to subscriptions with room; its digest, held.
    fn held_delivery(
        core: &mut ClientCore,
        m: &whispeer_protocol::Envelope,
        seq: u64,
    ) -> receive::Digest {
        match core.receive_with(&at(m, seq), NOW, &|_| true) {
            Delivery::Deliver { held: Some(d), .. } => d,
            _ => panic!("not delivered held"),
        }
    }

    /// `m` (digest `d`) is owed to durable "d"; the relay sends it again, replayed, at
    /// `seq`: what became of it. Afterwards nothing is owed, and the journal says paid.
    fn replay_owed(
        core: &mut ClientCore,
        m: &whispeer_protocol::Envelope,
        d: receive::Digest,
        seq: u64,
    ) -> Delivery {
        core.owed.owe("d", d);
        core.take_changes();
        let mut again = at(m, seq);
        again.flags = frame::msg_flags::REPLAYED;
        let delivery = core.receive_with(&again, NOW, &|_| true);
        assert!(core.owed_snapshot().is_empty(), "paid, not handed for good");
        let paid = receive::Change::Paid {
            durable: "d".into(),
            digest: d,
        };
        assert_eq!(core.take_changes(), vec![paid]);
        delivery
    }

    /// The same envelope with its last byte (the body's tag) flipped: it does not open.
    fn tampered(env: &whispeer_protocol::Envelope) -> whispeer_protocol::Envelope {
        let mut b = env.as_bytes().to_vec();
        *b.last_mut().unwrap() ^= 1;
        whispeer_protocol::Envelope::from_bytes(b.into()).unwrap()
    }

    fn resume_points(core: &mut ClientCore) -> Vec<(LocalSubId, Option<frame::Replay>, bool)> {
        assert!(core.enter_seq_space(SeqSpace::Named([1; 16])));
        let mut r: Vec<_> = core
            .resubscribe_all(NOW)
            .into_iter()
            .map(|f| match f {
                Frame::Sub(s) => (core.local_for(s.sub_id).unwrap(), s.replay, s.retained),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        r.sort_by_key(|r| r.0);
        r
    }

    /// Review finding: a relay that routes an envelope to a subscription and then drops
    /// the connection must not learn from the resubscribe whether it opened. The
    /// subscriptions it was routed to (by its tokens) resume after it whatever became of
    /// it: delivered, a duplicate, or unopenable alike; one it was not routed to does not
    /// move.
    #[test]
    fn positions_move_alike_whether_an_envelope_opened_or_not() {
        use frame::Replay::FromSeq;
        let outcome =
            |tenth: &dyn Fn(&whispeer_protocol::Envelope) -> whispeer_protocol::Envelope| {
                let (kr, mut rng) = one_tree(21);
                let mut core = ClientCore::new(kr.clone());
                core.enter_seq_space(SeqSpace::Named([1; 16]));
                let f = |s: &str| TopicFilter::new(s).unwrap();
                core.subscribe(1, f("a/#"), Qos::AtMostOnce, NOW).unwrap();
                core.subscribe(2, f("b"), Qos::AtMostOnce, NOW).unwrap();
                let env = sealed(&kr, &mut rng, "a/x", b"\x01");
                assert!(core.receive(&at(&env, 9), NOW).is_some());
                let stats = core.stats();
                assert!(core.receive(&at(&tenth(&env), 10), NOW).is_none());
                let after = core.stats();
                (
                    resume_points(&mut core),
                    after.rejected - stats.rejected,
                    after.duplicates - stats.duplicates,
                )
            };
        let want = vec![(1, Some(FromSeq(11)), false), (2, None, true)];
        assert_eq!(outcome(&tampered), (want.clone(), 1, 0), "unopenable");
        assert_eq!(outcome(&|e| e.clone()), (want, 0, 1), "duplicate");
    }

    /// Review finding (the second channel): an at-least-once subscription without room
    /// holds back every envelope the relay routed to it, whether it opens, is a duplicate
    /// or does not open — and its position stays for the relay's redelivery. An envelope
    /// routed to no such subscription is not held back.
    #[test]
    fn held_back_whatever_the_envelope_holds() {
        use frame::Replay::FromSeq;
        let (kr, mut rng) = one_tree(22);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe(1, f("a/#"), Qos::AtLeastOnce, NOW).unwrap();
        core.subscribe(2, f("b"), Qos::AtMostOnce, NOW).unwrap();
        let first = sealed(&kr, &mut rng, "a/x", b"\x01");
        let new = sealed(&kr, &mut rng, "a/y", b"\x02");
        let elsewhere = sealed(&kr, &mut rng, "b", b"\x03");
        assert!(core.receive(&at(&first, 9), NOW).is_some());
        let full = |_: LocalSubId| false;
        for (env, what) in [
            (new.clone(), "new"),
            (first.clone(), "duplicate"),
            (tampered(&new), "unopenable"),
        ] {
            assert!(
                matches!(
                    core.receive_with(&at(&env, 10), NOW, &full),
                    Delivery::HeldBack
                ),
                "{what}"
            );
        }
        assert_eq!(core.stats().held_back, 3);
        assert_eq!(
            core.stats().decompressed,
            1,
            "nothing held back was decompressed"
        );
        assert!(matches!(
            core.receive_with(&at(&elsewhere, 11), NOW, &full),
            Delivery::Deliver { .. }
        ));
        assert_eq!(
            resume_points(&mut core),
            vec![(1, Some(FromSeq(10)), false), (2, Some(FromSeq(12)), false)],
            "what was held back is asked for again"
        );
    }

    /// An unnumbered message (sequence 0: nothing sends it again) is never held back for
    /// want of room: an at-least-once subscription without room passes it as a drop
    /// (`lagged`), and an at-most-once neighbour with room gets it.
    #[test]
    fn an_unnumbered_message_is_not_held_back_for_want_of_room() {
        let (kr, mut rng) = one_tree(23);
        let mut core = ClientCore::new(kr.clone());
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe(1, f("a/#"), Qos::AtLeastOnce, NOW).unwrap();
        core.subscribe(2, f("a/#"), Qos::AtMostOnce, NOW).unwrap();
        let env = sealed(&kr, &mut rng, "a/x", b"\x01");
        let only_2 = |id: LocalSubId| id == 2;
        match core.receive_with(&at(&env, 0), NOW, &only_2) {
            Delivery::Deliver {
                targets, lagged, ..
            } => assert_eq!((targets, lagged), (vec![2], vec![1])),
            other => panic!("{other:?}"),
        }
        assert_eq!(core.stats().held_back, 0);
        // Numbered, it is held back from both (the relay sends it again).
        let env = sealed(&kr, &mut rng, "a/y", b"\x02");
        assert!(matches!(
            core.receive_with(&at(&env, 7), NOW, &only_2),
            Delivery::HeldBack
        ));
    }

    /// Review of 01c8fde (F1): the acks owed to a subscription whose live messages the
    /// relay holds back are bounded by what `skipped` remembers — also when what comes
    /// meanwhile is a duplicate, unopenable, or held back for lack of room (01c8fde
    /// remembered only messages new to the client, so those grew the debts without
    /// bound). The connection's calls, as `Engine::on_msg_opened` makes them.
    #[test]
    fn acks_owed_to_a_held_subscription_are_bounded_whatever_the_messages_are() {
        let (kr, mut rng) = one_tree(24);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        // A: live, at least once, on the same key id; B: at least once, in its history.
        core.subscribe(1, f("a/#"), Qos::AtLeastOnce, NOW).unwrap();
        let opts = SubscribeOptions::new()
            .qos(Qos::AtLeastOnce)
            .replay(frame::Replay::FromSeq(1));
        core.subscribe_with_options(2, f("a/#"), opts, NOW).unwrap();
        let rid = core.relay_ids(2)[0];
        core.sub_confirmed(rid, 0, true);
        let m = sealed(&kr, &mut rng, "a/x", b"\x01");
        let bad = tampered(&m);
        let mut acks = acks::AckQueue::new();
        let mut to = |core: &mut ClientCore, env: &whispeer_protocol::Envelope, seq, room| {
            let msg = at(env, seq);
            for sub in core.held_back_acking(&msg) {
                acks.owe(seq, sub);
            }
            let room = move |_: LocalSubId| room;
            let d = core.receive_with(&msg, NOW, &room);
            (d, acks.owed_len())
        };
        let mut delivered = 0;
        for seq in 1..=200 {
            // Copies of one message (the first new, the others duplicates), some not
            // opening, some held back for lack of room.
            let (d, owed) = match seq % 10 {
                3 => to(&mut core, &bad, seq, true),
                7 => to(&mut core, &m, seq, false),
                _ => to(&mut core, &m, seq, true),
            };
            if let Delivery::Deliver { targets, .. } = d {
                assert!(!targets.contains(&2), "held for 2: #{seq}");
                delivered += 1;
            }
            assert!(owed <= MAX_GOT, "{owed} sequences owed after #{seq}");
        }
        assert_eq!(delivered, 1, "one copy delivered (to 1)");
        assert_eq!(core.subs[&2].skipped.len(), MAX_GOT);
        // The relay's copy of the message new to the client is still 2's, once, past the
        // dedup window; a duplicate's sequence lets nothing past it.
        core.replay_done(rid, 200);
        let room = |_: LocalSubId| true;
        assert!(matches!(
            core.receive_with(&at(&m, 2), NOW, &room),
            Delivery::Placeholder
        ));
        match core.receive_with(&at(&m, 1), NOW, &room) {
            Delivery::Deliver { targets, .. } => assert_eq!(targets, vec![2]),
            _ => panic!("the held-back message's copy is not 2's"),
        }
        assert!(matches!(
            core.receive_with(&at(&m, 1), NOW, &room),
            Delivery::Placeholder
        ));
    }

    /// Review finding: a message handed to an at-least-once subscription only is held
    /// (persisted as seen once one takes it); one an at-most-once subscription gets too
    /// counts as delivered at once — its queue took it, and a copy re-posted later must
    /// stay a duplicate for it.
    #[test]
    fn a_message_is_held_only_when_every_target_acks() {
        let (kr, mut rng) = one_tree(23);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe(1, f("a/#"), Qos::AtLeastOnce, NOW).unwrap();
        core.subscribe(2, f("a/both"), Qos::AtMostOnce, NOW)
            .unwrap();
        let room = |_: LocalSubId| true;
        let only = sealed(&kr, &mut rng, "a/only", b"\x01");
        match core.receive_with(&at(&only, 9), NOW, &room) {
            Delivery::Deliver { held, targets, .. } => {
                assert_eq!(targets, vec![1]);
                assert!(held.is_some(), "at least once only: held");
                core.dedup_hold(held.unwrap(), 1);
            }
            _ => panic!("not delivered"),
        }
        let both = sealed(&kr, &mut rng, "a/both", b"\x02");
        match core.receive_with(&at(&both, 10), NOW, &room) {
            Delivery::Deliver {
                held, mut targets, ..
            } => {
                targets.sort();
                assert_eq!(targets, vec![1, 2]);
                assert!(held.is_none(), "an at-most-once target took it: delivered");
            }
            _ => panic!("not delivered"),
        }
    }

    /// Review finding (4, b62efe4): subscription A (at least once) holds m, the topic's
    /// newest; subscription B (at most once, asking for retained values) is then sent m as
    /// the topic's current value, and the app sees it. That copy counts as delivered at
    /// once, as a new message an at-most-once subscription gets does: m's dedup entry and
    /// its mark are journalled. Left held, nothing was: after a crash the saved mark was
    /// m0's, and a hostile relay's older retained value (m0 < v < m) was accepted — a
    /// rollback from what the app saw — and m shown again.
    #[test]
    fn a_held_messages_retained_copy_shown_at_most_once_is_delivered_for_good() {
        use frame::msg_flags::RETAINED;
        let (kr, mut rng) = one_tree(31);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe(1, f("a/x"), Qos::AtLeastOnce, NOW).unwrap();
        let mut seal_at = |ts: u64| {
            seal_publish(
                &kr,
                None,
                &SealPolicy::default(),
                &mut Sealer::new(),
                &Topic::new("a/x").unwrap(),
                OCTETS,
                b"\x01",
                ts,
                &mut rng,
            )
            .unwrap()
        };
        let (m0, _) = seal_at(NOW - 3_000);
        let (m, m_id) = seal_at(NOW - 1_000);
        // A takes m0; m it holds untaken.
        let d0 = held_delivery(&mut core, &m0, 9);
        core.dedup_hold(d0, 1);
        core.dedup_taken(d0, None);
        let d = held_delivery(&mut core, &m, 10);
        core.dedup_hold(d, 1);
        core.take_changes();
        // B subscribes; the relay sends it m, the topic's current value.
        let opts = SubscribeOptions::new();
        core.subscribe_with_options(2, f("a/x"), opts, NOW).unwrap();
        let mut copy = at(&m, 10);
        copy.flags = RETAINED;
        copy.sub_id = Some(core.relay_ids(2)[0]);
        match core.receive_with(&copy, NOW, &|_| true) {
            Delivery::Deliver { targets, held, .. } => {
                assert_eq!(targets, vec![2]);
                assert!(held.is_none(), "B does not ack: nothing to take");
            }
            _ => panic!("the current value is not shown to B"),
        }
        let changes = core.take_changes();
        assert!(
            changes.iter().any(
                |c| matches!(c, receive::Change::Seen { key, .. } if receive::digest(key) == d)
            ),
            "m's dedup entry is saved: {changes:?}"
        );
        assert!(
            changes.iter().any(|c| matches!(c,
                receive::Change::Retained { ts_ms, msg_id, .. }
                    if *ts_ms == NOW - 1_000 && *msg_id == m_id.0)),
            "m's mark is saved: {changes:?}"
        );
        // A takes it later, or lets it go: nothing changes (delivered for good).
        core.dedup_untaken(d, None);
        assert!(core.guard().remembers(d));
    }

    /// Review finding: messages owed while a durable's subscription holds them (bounded by
    /// that subscription's capacity) do not use up the bound on owed messages, so a slow
    /// durable beside a fast subscription does not stop another durable from being owed
    /// what it dropped.
    #[test]
    fn messages_owed_while_held_do_not_use_up_the_bound() {
        let mut core = ClientCore::new(Arc::new(RwLock::new(Keyring::new())));
        for d in 0..(MAX_OWED as u128 * 2) {
            core.dedup_co_held(d, "slow");
        }
        core.dedup_untaken(u128::MAX, Some("other"));
        assert!(core.owed.contains("other", &u128::MAX));
        assert_eq!(core.owed.owed_len, 1);
        // Dropped untaken, the held ones become owed like any other (beyond the bound:
        // each was one of the subscription's queued messages).
        core.dedup_owe(0, "slow");
        assert!(core.owed.contains("slow", &0));
        // All dropped: owed in memory up to the bound only (their saved records stay).
        for d in 1..(MAX_OWED as u128 * 2) {
            core.dedup_owe(d, "slow");
        }
        assert_eq!(core.owed.owed_len, MAX_OWED);
        assert!(core.owed.handed.is_empty());
    }

    /// The owed records (`Owed`, `Paid`) among the changes since the last call.
    fn owed_changes(core: &mut ClientCore) -> Vec<receive::Change> {
        core.take_changes()
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    receive::Change::Owed { .. } | receive::Change::Paid { .. }
                )
            })
            .collect()
    }

    /// A durable subscription in its hand-over (the relay holds its live messages back
    /// until `ReplayDone`) awaits the relay's own copy of a message new to the client that
    /// reached it meanwhile for a neighbour, holding no copy of it. Once a neighbour takes
    /// it (or it counts as delivered at once) it is owed to the durable, saved, until the
    /// durable takes its copy; a durable that goes away (or forgets the sequences, another
    /// sequence space) before its copy came is owed it; one that took another copy itself
    /// is not. What is awaited goes with the copy or the subscription, and is bounded by
    /// what `skipped` remembers.
    #[test]
    fn a_message_a_durable_awaits_in_its_hand_over_is_owed_once_delivered_elsewhere() {
        use receive::Change;
        let owed = |d| Change::Owed {
            durable: "d".into(),
            digest: d,
        };
        let paid = |d| Change::Paid {
            durable: "d".into(),
            digest: d,
        };
        let (kr, mut rng) = one_tree(27);
        let mut core = durable_core(&kr, receive::ReceiveConfig::default());
        let f = |s: &str| TopicFilter::new(s).unwrap();
        // 2: a plain at-least-once neighbour (no hand-over); 3: at most once, on "a/y".
        core.subscribe(2, f("a/x"), Qos::AtLeastOnce, NOW).unwrap();
        core.subscribe(3, f("a/y"), Qos::AtMostOnce, NOW).unwrap();
        let rid = core.relay_ids(1)[0];
        core.sub_confirmed(rid, 0, true); // durable 1: in its hand-over
        let room = |_: LocalSubId| true;

        // Taken by the neighbour while the durable awaits its copy: owed from then on.
        let m = sealed(&kr, &mut rng, "a/x", b"\x01");
        let d = held_delivery(&mut core, &m, 5);
        assert_eq!(core.awaited.get(&d), Some(&vec![1]));
        core.dedup_hold(d, 1);
        assert!(owed_changes(&mut core).is_empty(), "not delivered yet");
        core.dedup_taken(d, None);
        assert_eq!(owed_changes(&mut core), vec![owed(d)]);
        // Its copy after `ReplayDone`: the durable's, tracked until taken, then paid.
        assert!(core.replay_done(rid, 0));
        match core.receive_with(&at(&m, 5), NOW, &room) {
            Delivery::Deliver {
                targets, digest, ..
            } => {
                assert_eq!((targets, digest), (vec![1], Some(d)));
            }
            _ => panic!("the awaited copy is the durable's"),
        }
        assert!(core.awaited.is_empty(), "its copy came");
        core.dedup_co_held(d, "d"); // the engine: a copy of a message delivered at once
        core.dedup_taken(d, Some("d"));
        assert_eq!(owed_changes(&mut core), vec![paid(d)]);
        assert!(core.owed_snapshot().is_empty());

        // In a hand-over again (a resume): delivered at once (an at-most-once neighbour
        // took it) is owed at once.
        core.sub_confirmed(rid, 5, true);
        let m2 = sealed(&kr, &mut rng, "a/y", b"\x02");
        assert!(matches!(
            core.receive_with(&at(&m2, 6), NOW, &room),
            Delivery::Deliver { held: None, .. }
        ));
        let d2 = *core.subs[&1].skipped[&6].as_ref().unwrap();
        assert_eq!(owed_changes(&mut core), vec![owed(d2)]);
        // Held by the neighbour, untaken, when the durable goes: owed at the unsubscribe
        // (and nothing more when the neighbour takes it later).
        let m3 = sealed(&kr, &mut rng, "a/x", b"\x03");
        let d3 = held_delivery(&mut core, &m3, 7);
        core.dedup_hold(d3, 1);
        core.unsubscribe(1);
        assert!(core.awaited.is_empty(), "gone with its subscription");
        // d2 was handed (owed, saved): owed as before, nothing new to write.
        assert_eq!(owed_changes(&mut core), vec![owed(d3)]);
        assert!(core.owed.contains("d", &d2) && core.owed.contains("d", &d3));
        core.dedup_taken(d3, None);
        assert!(owed_changes(&mut core).is_empty());

        // Not owed to a durable that took another copy of it itself; and what a durable
        // awaits is dropped (owed) when it enters another sequence space.
        let mut core = durable_core(&kr, receive::ReceiveConfig::default());
        core.subscribe(2, f("a/x"), Qos::AtLeastOnce, NOW).unwrap();
        let rid = core.relay_ids(1)[0];
        core.sub_confirmed(rid, 0, true);
        let m4 = sealed(&kr, &mut rng, "a/x", b"\x04");
        let d4 = held_delivery(&mut core, &m4, 8);
        core.dedup_hold(d4, 1);
        core.dedup_taken(d4, Some("d")); // as if the durable took a copy (its retained value)
        assert!(owed_changes(&mut core).is_empty());
        assert!(core.awaited.is_empty(), "the durable has it");
        let m5 = sealed(&kr, &mut rng, "a/x", b"\x05");
        let d5 = held_delivery(&mut core, &m5, 9);
        core.dedup_hold(d5, 1);
        assert!(!core.enter_seq_space(SeqSpace::Named([2; 16])));
        assert!(core.awaited.is_empty() && core.subs[&1].skipped.is_empty());
        assert_eq!(owed_changes(&mut core), vec![owed(d5)]);

        // Bounded by `skipped`: a durable in a hand-over that never ends.
        let mut core = durable_core(&kr, receive::ReceiveConfig::default());
        core.subscribe(2, f("a/x"), Qos::AtMostOnce, NOW).unwrap();
        let rid = core.relay_ids(1)[0];
        core.sub_confirmed(rid, 0, true);
        for seq in 1..=(MAX_GOT as u64 * 2) {
            let m = sealed(&kr, &mut rng, "a/x", &seq.to_le_bytes());
            assert!(matches!(
                core.receive_with(&at(&m, seq), NOW, &room),
                Delivery::Deliver { .. }
            ));
        }
        assert_eq!(core.awaited.len(), MAX_GOT);
        assert_eq!(core.owed.handed.get("d").map(|h| h.len()), Some(MAX_GOT));
        core.unsubscribe(1);
        assert!(core.awaited.is_empty());
        assert_eq!(core.owed.owed_len, MAX_GOT.min(MAX_OWED));
    }

    /// A subscription in its hand-over takes a message once, whichever copy comes first
    /// (with real parts: `delivery::a_durable_in_its_hand_over_takes_a_message_once_whichever_copy_comes_first`).
    /// The message reached the client for a neighbour while the relay held back its own
    /// copy for the durable (its `skipped` exception), and the durable took it from its own
    /// retained values: at that sequence, or at another one (the relay stored the envelope
    /// twice, once before the durable's boundary). The relay's copy after its `ReplayDone`
    /// is a duplicate for it then: a placeholder, and nothing is awaited any more. Before,
    /// a retained copy at another sequence left the exception in place and the durable got
    /// the message twice.
    #[test]
    fn a_subscription_in_its_hand_over_takes_a_message_once_whichever_copy_comes_first() {
        let (kr, mut rng) = one_tree(28);
        let room = |_: LocalSubId| true;
        for retained_at in [7, 3] {
            let mut core = durable_core(&kr, receive::ReceiveConfig::default());
            core.subscribe(2, TopicFilter::new("a/x").unwrap(), Qos::AtLeastOnce, NOW)
                .unwrap();
            let rid = core.relay_ids(1)[0];
            core.sub_confirmed(rid, 5, true); // durable 1: in its hand-over, boundary 5
            let m = sealed(&kr, &mut rng, "a/x", b"\x01");
            // Live at 7 for the neighbour, which takes it; the durable awaits its copy.
            let d = held_delivery(&mut core, &m, 7);
            core.dedup_hold(d, 1);
            core.dedup_taken(d, None);
            assert_eq!(core.awaited.get(&d), Some(&vec![1]));
            let retained = Msg {
                sub_id: Some(rid),
                flags: frame::msg_flags::RETAINED,
                ..at(&m, retained_at)
            };
            match core.receive_with(&retained, NOW, &room) {
                Delivery::Deliver { targets, .. } => assert_eq!(targets, vec![1]),
                _ => panic!("the durable's retained value (at {retained_at}) is its own"),
            }
            core.replay_done(rid, 5);
            let dups = core.stats().duplicates;
            assert!(
                matches!(
                    core.receive_with(&at(&m, 7), NOW, &room),
                    Delivery::Placeholder
                ),
                "the relay's copy at 7 after a retained copy at {retained_at}: not again"
            );
            assert_eq!(core.stats().duplicates, dups + 1);
            assert!(core.awaited.is_empty(), "the durable has the message");
            assert!(core.subs[&1].awaiting.is_empty());
            assert!(core.subs[&1].skipped.values().all(Option::is_none));
        }
    }

    /// A redelivered copy (`REDELIVERED` alone, no `sub_id`) names no subscription: the
    /// relay sends it for whichever subscriptions of the connection did not ack its
    /// sequence. At or below a relay subscription's boundary (`SubOk.seq`), or before its
    /// `SubOk`, it is history: it goes only to subscriptions whose history the relay
    /// tracks (a replay, from where it starts, or a durable) — never to a live-only or
    /// retained-only one, which is still routed it (a placeholder, acked as before).
    /// Above the boundary it is a live message, everyone's. The same on every connection,
    /// from that connection's `SubOk`. Before, a live-only subscription got a message from
    /// before it started: another's replayed one the client had not seen.
    /// A subscription's own retained value held back for want of room comes back as a
    /// redelivered copy (the relay tracks retained values under the credit, PROTOCOL
    /// §3.5.5): at or below its boundary and naming no subscription, yet its own — not a
    /// placeholder (acked, lost). A live-only neighbour still does not get it.
    #[test]
    fn a_retained_value_held_back_for_want_of_room_is_taken_when_redelivered() {
        let (kr, mut rng) = one_tree(30);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let o = || SubscribeOptions::new().qos(Qos::AtLeastOnce);
        core.subscribe_with_options(1, f("a/#"), o().retained(true), NOW)
            .unwrap();
        core.subscribe_with_options(2, f("a/#"), o().retained(false), NOW)
            .unwrap();
        let rid = core.relay_ids(1)[0];
        core.sub_confirmed(rid, 5, false);
        core.sub_confirmed(core.relay_ids(2)[0], 5, false);
        let m = sealed(&kr, &mut rng, "a/x", b"\x01");
        let retained = Msg {
            sub_id: Some(rid),
            flags: frame::msg_flags::RETAINED,
            ..at(&m, 3)
        };
        assert!(matches!(
            core.receive_with(&retained, NOW, &|_| false),
            Delivery::HeldBack
        ));
        let again = Msg {
            flags: frame::msg_flags::REDELIVERED,
            ..at(&m, 3)
        };
        match core.receive_with(&again, NOW, &|_| true) {
            Delivery::Deliver { targets, .. } => assert_eq!(targets, vec![1]),
            other => panic!("its own retained value, redelivered: {other:?}"),
        }
        assert!(core.subs[&1].held_retained.is_empty());
    }

    /// PROTOCOL §3.5.5 "Order": an at-least-once subscription that did not take a live
    /// message (no room: the relay paused it there, or tracks that copy and redelivers
    /// it) takes no later live copy that a neighbour on the connection could have been
    /// sent — the relay sends it the earlier one first, then that one, from its store. A
    /// copy of one it awaits settles it and every lower one (one the store did not keep
    /// never comes); a message only it could have been sent is its own stream, taken and
    /// settling what is below; a redelivered copy is never held for the order. Bounded,
    /// and forgotten with the relay subscription.
    #[test]
    fn a_subscription_that_missed_a_message_takes_no_later_live_copy_before_it() {
        let (kr, mut rng) = one_tree(31);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        // 1: credit 1 on `a/#`; 2: a live-only neighbour on `a/x`.
        let opts = SubscribeOptions::new().qos(Qos::AtLeastOnce).capacity(1);
        core.subscribe_with_options(1, f("a/#"), opts, NOW).unwrap();
        core.subscribe(2, f("a/x"), Qos::AtMostOnce, NOW).unwrap();
        core.sub_confirmed(core.relay_ids(1)[0], 0, false);
        core.sub_confirmed(core.relay_ids(2)[0], 0, false);
        let x: Vec<_> = (0..16u8)
            .map(|i| sealed(&kr, &mut rng, "a/x", &[i]))
            .collect();
        let y = sealed(&kr, &mut rng, "a/y", b"y");
        // Delivered to (`None`: held back), subscription 1 having room or not.
        fn recv(core: &mut ClientCore, msg: &Msg, room: bool) -> Option<Vec<LocalSubId>> {
            match core.receive_with(msg, NOW, &|id| id != 1 || room) {
                Delivery::Deliver { targets, .. } => Some(targets),
                Delivery::HeldBack => None,
                other => panic!("{other:?}"),
            }
        }
        let c = &mut core;
        let deliver = Some(vec![1, 2]);
        assert_eq!(recv(c, &at(&x[1], 1), true), deliver);
        assert_eq!(recv(c, &at(&x[2], 2), false), None, "no room: paused there");
        // Room again, but 2 is still owed: the neighbour's copies of 3 and 4 wait.
        assert_eq!(recv(c, &at(&x[3], 3), true), None);
        assert_eq!(recv(c, &at(&x[4], 4), true), None);
        // The relay's catch-up: 2; a live 5 for the neighbour meanwhile waits too.
        assert_eq!(recv(c, &at(&x[2], 2), true), deliver);
        assert_eq!(recv(c, &at(&x[5], 5), true), None);
        // 3 was not kept by the store: 4 settles it.
        assert_eq!(recv(c, &at(&x[4], 4), true), deliver);
        assert_eq!(recv(c, &at(&x[5], 5), true), deliver);
        assert!(c.subs[&1].behind.is_empty());
        assert_eq!(recv(c, &at(&x[6], 6), true), deliver, "nothing awaited");

        // Only subscription 1 can have been sent `a/y`: its own stream, taken, and past 7.
        assert_eq!(recv(c, &at(&x[7], 7), false), None);
        assert_eq!(recv(c, &at(&y, 8), true), Some(vec![1]));
        assert_eq!(recv(c, &at(&x[9], 9), true), deliver);

        // A redelivered copy of one it awaits is taken as it comes.
        assert_eq!(recv(c, &at(&x[10], 10), false), None);
        let again = Msg {
            flags: frame::msg_flags::REDELIVERED,
            ..at(&x[10], 10)
        };
        assert_eq!(recv(c, &again, true), Some(vec![1]));
        assert_eq!(recv(c, &at(&x[11], 11), true), deliver);
        assert_eq!((c.stats().held_back, c.stats().held_for_order), (3, 3));

        // Bounded: past MAX_GOT awaited sequences it starts again from the newest.
        for seq in 100..100 + MAX_GOT as u64 + 1 {
            assert_eq!(recv(c, &at(&x[12], seq), false), None);
        }
        assert_eq!(c.subs[&1].behind.len(), 1);
        // A new relay subscription resumes by position: nothing awaited.
        core.resubscribe_all(NOW);
        assert!(core.subs[&1].behind.is_empty());
    }

    /// A `Gap` naming a relay subscription (PROTOCOL §3.3.11 key 2) settles what the local
    /// subscription awaits of that relay subscription's key id only: another key id's
    /// relay subscription (a subscription spanning epochs) may still be paused.
    #[test]
    fn a_gap_naming_a_relay_subscription_settles_its_key_id_only() {
        let (kr, _) = one_tree(33);
        let mut core = ClientCore::new(kr);
        let opts = SubscribeOptions::new().qos(Qos::AtLeastOnce).capacity(1);
        core.subscribe_with_options(1, TopicFilter::new("a/#").unwrap(), opts, NOW)
            .unwrap();
        let rid = core.relay_ids(1)[0];
        let own = *core.subs[&1].patterns[0].key_id();
        let other = whispeer_protocol::KeyId::from_bytes([0xee; 16]);
        assert_ne!(own, other);
        for seq in [3, 5] {
            core.subs.get_mut(&1).unwrap().behind.insert((own, seq));
            core.subs
                .get_mut(&1)
                .unwrap()
                .behind
                .insert((other, seq + 1));
        }
        core.lost_while_paused(rid + 1000); // names no subscription: nothing changes
        assert_eq!(core.subs[&1].behind.len(), 4);
        core.lost_while_paused(rid);
        let left: Vec<_> = core.subs[&1].behind.iter().copied().collect();
        assert_eq!(left, vec![(other, 4), (other, 6)]);
    }

    /// The same past a hand-over: the relay may send a subscription's held-back live
    /// messages after its `ReplayDone` in steps, or from its store once they spilled there
    /// (PROTOCOL §3.5.5), while a neighbour's live copies keep coming. What it held back for
    /// its hand-over is awaited like a message it had no room for.
    #[test]
    fn a_subscription_past_its_hand_over_takes_the_relays_copies_before_later_live_ones() {
        let (kr, mut rng) = one_tree(32);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let opts = SubscribeOptions::new()
            .qos(Qos::AtLeastOnce)
            .replay(frame::Replay::FromSeq(1));
        core.subscribe_with_options(1, f("a/#"), opts, NOW).unwrap();
        core.subscribe(2, f("a/#"), Qos::AtMostOnce, NOW).unwrap();
        let rid = core.relay_ids(1)[0];
        core.sub_confirmed(rid, 5, true); // in its hand-over, boundary 5
        core.sub_confirmed(core.relay_ids(2)[0], 5, false);
        let x: Vec<_> = (0..9u8)
            .map(|i| sealed(&kr, &mut rng, "a/x", &[i]))
            .collect();
        // Delivered to (`None`: held back), everyone having room.
        let recv = |core: &mut ClientCore, seq: u64| match core.receive_with(
            &at(&x[seq as usize], seq),
            NOW,
            &|_| true,
        ) {
            Delivery::Deliver { targets, .. } => Some(targets),
            Delivery::HeldBack => None,
            other => panic!("{other:?}"),
        };
        let c = &mut core;
        assert_eq!(
            recv(c, 6),
            Some(vec![2]),
            "the neighbour's; held for the other"
        );
        c.replay_done(rid, 5);
        assert_eq!(
            recv(c, 7),
            None,
            "a live 7 before the relay's copy of 6 waits"
        );
        assert_eq!(recv(c, 6), Some(vec![1]), "the relay's own copy of 6");
        assert_eq!(recv(c, 7), Some(vec![1, 2]));
        assert_eq!(recv(c, 8), Some(vec![1, 2]));
    }

    #[test]
    fn a_redelivered_copy_goes_only_to_subscriptions_whose_history_it_may_be() {
        use frame::Replay::FromSeq;
        let (kr, mut rng) = one_tree(29);
        let mut core = ClientCore::new(kr.clone());
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let o = || {
            SubscribeOptions::new()
                .qos(Qos::AtLeastOnce)
                .retained(false)
        };
        // 1: history from 1; 2: live only; 3: retained values; 4: durable; 5: from 4.
        let subs = [
            o().replay(FromSeq(1)),
            o(),
            o().retained(true),
            o().durable("d"),
            o().replay(FromSeq(4)),
        ];
        for (id, opts) in (1..).zip(subs) {
            core.subscribe_with_options(id, f("a/#"), opts, NOW)
                .unwrap();
        }
        let again = |m: &whispeer_protocol::Envelope, seq| Msg {
            flags: frame::msg_flags::REDELIVERED,
            ..at(m, seq)
        };
        let (y1, y2) = (
            sealed(&kr, &mut rng, "b/y", b"\x06"),
            sealed(&kr, &mut rng, "c/z", b"\x07"),
        );
        // A new message on "a/x" redelivered at `seq`: delivered to, and routed to.
        let mut redelivered = |core: &mut ClientCore, seq: u64| {
            let msg = again(&sealed(&kr, &mut rng, "a/x", &seq.to_le_bytes()), seq);
            let routed = core.route_acking(&msg);
            let to = core.receive(&msg, NOW).map(|(_, mut t)| {
                t.sort();
                t
            });
            (to, routed)
        };
        let everyone = vec![1, 2, 3, 4, 5];
        // Before any `SubOk`: history only.
        assert_eq!(
            redelivered(&mut core, 2),
            (Some(vec![1, 4]), everyone.clone())
        );
        let confirm = |core: &mut ClientCore, ids: &[LocalSubId], boundary| {
            for id in ids {
                let rid = core.relay_ids(*id)[0];
                core.sub_confirmed(rid, boundary, false);
            }
        };
        confirm(&mut core, &everyone, 5);
        assert_eq!(
            redelivered(&mut core, 3),
            (Some(vec![1, 4]), everyone.clone())
        );
        assert_eq!(
            redelivered(&mut core, 5),
            (Some(vec![1, 4, 5]), everyone.clone())
        );
        assert_eq!(
            redelivered(&mut core, 6),
            (Some(everyone.clone()), everyone.clone())
        );
        // Only a live-only one matches: nothing delivered, and not counted as refused.
        core.subscribe_with_options(6, f("b/y"), o(), NOW).unwrap();
        confirm(&mut core, &[6], 6);
        let msg = again(&y1, 4);
        assert_eq!(core.route_acking(&msg), vec![6]);
        let rejected = core.stats().rejected;
        assert!(matches!(
            core.receive_with(&msg, NOW, &|_| true),
            Delivery::Placeholder
        ));
        assert_eq!(core.stats().rejected, rejected);

        // A new connection: each starts at its new `SubOk`. 1 to 5 handled 6, so they
        // resume in history from 7 (the live-only and retained ones too: the relay sends
        // what came while they were away), the durable from the relay's floor; 7,
        // subscribed on the new connection, is live only.
        assert!(core.enter_seq_space(SeqSpace::Named([1; 16])));
        let _ = core.resubscribe_all(NOW);
        core.subscribe_with_options(7, f("c/#"), o(), NOW).unwrap();
        assert_eq!(
            redelivered(&mut core, 8),
            (Some(everyone.clone()), everyone.clone())
        );
        confirm(&mut core, &[1, 2, 3, 4, 5, 6, 7], 10);
        assert_eq!(redelivered(&mut core, 6), (Some(vec![4]), everyone.clone()));
        assert!(
            core.receive(&again(&y2, 9), NOW).is_none(),
            "7 started at 10"
        );
        let above = core.receive(&again(&y2, 11), NOW);
        assert_eq!(above.map(|(_, t)| t), Some(vec![7]));
    }

    /// Review finding: an owed message a relay sends again with sequence 0 (unstored: no
    /// slot, nothing to take) is paid, not left handed for good.
    #[test]
    fn an_owed_message_sent_again_unstored_is_paid() {
        let (kr, mut rng) = one_tree(26);
        let mut core = durable_core(&kr, receive::ReceiveConfig::default());
        let m = sealed(&kr, &mut rng, "a/x", b"\x01");
        let d = held_delivery(&mut core, &m, 9);
        core.dedup_hold(d, 1);
        core.dedup_taken(d, None);
        let delivery = replay_owed(&mut core, &m, d, 0);
        assert!(matches!(delivery, Delivery::Deliver { .. }));
    }

    /// Review finding: an owed message the durable is handed only as a placeholder (its
    /// payload is over the cap) is paid then — not left handed for good, counted against
    /// the bound and saved at every start.
    #[test]
    fn an_owed_message_handed_as_a_placeholder_is_paid() {
        let (kr, mut rng) = one_tree(25);
        let cfg = receive::ReceiveConfig {
            max_payload: 8,
            ..receive::ReceiveConfig::default()
        };
        let mut core = durable_core(&kr, cfg);
        let room = |_: LocalSubId| true;
        let m = sealed(&kr, &mut rng, "a/x", &[7; 64]);
        assert!(matches!(
            core.receive_with(&at(&m, 9), NOW, &room),
            Delivery::Placeholder
        ));
        let d = core.guard.snapshot(NOW).seen[0].0;
        let delivery = replay_owed(&mut core, &m, d, 9);
        assert!(matches!(delivery, Delivery::Placeholder));
    }

    /// Review finding: a message held for an at-least-once subscription, forgotten by a
    /// full window while it waited untaken (the window's start passed its date) and then
    /// let go, is delivered when the relay sends it again: the guard accepts it as
    /// released, and the delivery holds it to the horizon, not to the window's start
    /// (which would leave it no subscription: a placeholder, acked, lost).
    #[test]
    fn a_released_message_the_full_window_forgot_is_delivered_again() {
        let (kr, mut rng) = one_tree(24);
        let cfg = receive::ReceiveConfig {
            max_entries: 4,
            ..receive::ReceiveConfig::default()
        };
        let mut core = ClientCore::with_config(kr.clone(), cfg);
        core.enter_seq_space(SeqSpace::Named([1; 16]));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        core.subscribe(1, f("a/#"), Qos::AtLeastOnce, NOW).unwrap();
        core.sub_confirmed(core.relay_ids(1)[0], 0, false); // its redelivery is its own
        let room = |_: LocalSubId| true;
        let m = sealed(&kr, &mut rng, "a/x", b"\x01");
        let d = held_delivery(&mut core, &m, 9);
        core.dedup_hold(d, 1);
        for seq in 10..20u64 {
            let e = sealed(&kr, &mut rng, "a/y", &[seq as u8]);
            core.receive(&at(&e, seq), NOW);
        }
        assert!(core.guard.forgot_upto() > 0, "the window forgot for room");
        core.dedup_untaken(d, None);
        let mut again = at(&m, 9);
        again.flags = frame::msg_flags::REDELIVERED;
        match core.receive_with(&again, NOW, &room) {
            Delivery::Deliver { targets, .. } => assert_eq!(targets, vec![1]),
            _ => panic!("the released message was not delivered again"),
        }
    }

    /// Review finding: a small envelope whose payload is 16 MiB of zeros (zstd keeps them
    /// in well under 4 KiB) is decompressed once at most: a duplicate — a replay of the
    /// captured envelope, which needs no key — is dropped before its payload is looked at.
    /// Under a lower cap it is refused from its declared size and its id remembered, so
    /// replays of it cost nothing either. An open job decompresses a payload at once only
    /// within a small multiple of its envelope.
    #[test]
    fn a_small_envelope_of_a_large_payload_is_decompressed_once_at_most() {
        let (kr, mut rng) = one_tree(23);
        let bomb = sealed(&kr, &mut rng, "a/x", &vec![0u8; 16 << 20]);
        assert!(bomb.as_bytes().len() < 4096, "{}", bomb.as_bytes().len());
        let f = || TopicFilter::new("a/#").unwrap();
        // The default cap (16 MiB, what a default publisher seals): delivered once.
        let mut core = ClientCore::new(kr.clone());
        core.subscribe(1, f(), Qos::AtMostOnce, NOW).unwrap();
        let (m, to) = core.receive(&at(&bomb, 9), NOW).expect("delivered");
        assert_eq!((m.payload.len(), to), (16 << 20, vec![1]));
        for seq in [9, 10, 11] {
            assert!(core.receive(&at(&bomb, seq), NOW).is_none());
        }
        let s = core.stats();
        assert_eq!((s.decompressed, s.duplicates, s.delivered), (1, 3, 1));
        // A lower cap: refused, and its replays are duplicates, never decompressed again.
        let cfg = receive::ReceiveConfig {
            max_payload: 1 << 20,
            ..Default::default()
        };
        let mut core = ClientCore::with_config(kr.clone(), cfg);
        core.subscribe(1, f(), Qos::AtMostOnce, NOW).unwrap();
        assert!(core.receive(&at(&bomb, 9), NOW).is_none());
        assert!(core.receive(&at(&bomb, 10), NOW).is_none());
        let s = core.stats();
        assert_eq!((s.decompressed, s.rejected, s.duplicates), (1, 1, 1));
        let small = sealed(&kr, &mut rng, "a/y", &[7u8; 1000]);
        assert!(core.receive(&at(&small, 11), NOW).is_some());
        // On a worker: the bomb's payload is left for after the checks, a small one not.
        let mut core = ClientCore::new(kr.clone());
        core.subscribe(1, f(), Qos::AtMostOnce, NOW).unwrap();
        let mut opener = Opener::new();
        let mut job = |env: &whispeer_protocol::Envelope, id, seq| {
            let (kr, roots) = (kr.clone(), core.roots().clone());
            jobs::OpenJob::new(id, &at(env, seq), NOW, core.max_payload(), kr, roots)
                .run(&mut opener)
                .result
        };
        let (b1, b2, s1) = (job(&bomb, 1, 9), job(&bomb, 2, 10), job(&small, 3, 11));
        assert!(!b1.as_ref().unwrap().decompressed() && !b2.as_ref().unwrap().decompressed());
        assert!(
            s1.as_ref().unwrap().decompressed(),
            "within the early bound"
        );
        let all = |_: LocalSubId| true;
        for (seq, u) in [(9, b1), (10, b2), (11, s1)] {
            let env = if seq == 11 { &small } else { &bomb };
            core.receive_opened(&at(env, seq), u, NOW, &all);
        }
        let s = core.stats();
        assert_eq!((s.decompressed, s.duplicates, s.delivered), (2, 1, 2));
    }

    #[test]
    fn no_key_no_subscription_and_rejections_counted() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let tk = TreeKey::generate_with("t", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_grant_at(tk.grant(&Scope::Subtree(Topic::new("a").unwrap())), 0)
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
        full.add_tree_key_at(&tk, 0).unwrap();
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
                    paused: None,
                    sub_id: None,
                    seq: 1,
                    envelope: env,
                    flags: 0
                },
                0
            )
            .is_none());
        assert_eq!(core.stats().rejected, 1);
    }

    /// A subscription is bound to one tree (PROTOCOL §4.11, receiving): with grants of two
    /// trees overlapping its filter, a subscribe naming no tree fails naming both; one
    /// bound to tree A is never handed a message tree B's key opened on a matching topic
    /// (B's admin could otherwise write into it with admin-signed provenance), and a
    /// grant of another tree added later does not widen it on resubscribe.
    #[test]
    fn a_subscription_gets_only_its_own_trees_messages() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let a = TreeKey::generate_with("work", &mut rng).unwrap();
        let b = TreeKey::generate_with("mallory", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_grant_at(a.grant(&Scope::Subtree(Topic::new("alerts").unwrap())), 0)
            .unwrap();
        kr.add_grant_at(b.grant_all(), 0).unwrap();
        let kr = Arc::new(RwLock::new(kr));
        let mut core = ClientCore::new(kr.clone());
        let filter = TopicFilter::new("alerts/#").unwrap();

        match core.subscribe(1, filter.clone(), Qos::AtMostOnce, NOW) {
            Err(SubscribeError::Key(whispeer_protocol::KeyError::AmbiguousTree {
                topic,
                trees,
            })) => {
                assert_eq!(topic, "alerts/#");
                for id in [a.tree_id(), b.tree_id()] {
                    assert!(trees.contains(&id.to_string()), "{trees} names {id}");
                }
            }
            other => panic!("expected AmbiguousTree, got {other:?}"),
        }
        assert!(core.tree_of(1).is_none(), "nothing registered");

        let frames = core
            .subscribe_with_options(
                1,
                filter.clone(),
                SubscribeOptions::new().tree(a.tree_id()),
                NOW,
            )
            .unwrap();
        let key_ids = |frames: &[Frame]| -> Vec<whispeer_protocol::KeyId> {
            frames
                .iter()
                .filter_map(|f| match f {
                    Frame::Sub(s) => Some(*s.pattern.key_id()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(key_ids(&frames), vec![a.cert().keys().key_id()]);
        assert_eq!(core.tree_of(1), Some(a.tree_id()));
        // A filter only one tree's grants overlap binds to that tree without naming it.
        core.subscribe(2, TopicFilter::new("news/#").unwrap(), Qos::AtMostOnce, NOW)
            .unwrap();
        assert_eq!(core.tree_of(2), Some(b.tree_id()));

        let seal_in = |tk: &TreeKey, payload: &[u8], rng: &mut rand_chacha::ChaCha20Rng| {
            let mut k = Keyring::new();
            k.add_tree_key_at(tk, 0).unwrap();
            seal_publish(
                &RwLock::new(k),
                None,
                &SealPolicy::default(),
                &mut Sealer::new(),
                &Topic::new("alerts/x").unwrap(),
                OCTETS,
                payload,
                NOW,
                rng,
            )
            .unwrap()
            .0
        };
        // Mallory, B's admin, on alerts/x: opens (the victim holds B's `#`), reaches no one.
        let injected = seal_in(&b, b"fire", &mut rng);
        assert!(core.receive(&at(&injected, 1), NOW).is_none());
        let genuine = seal_in(&a, b"drill", &mut rng);
        let (m, targets) = core.receive(&at(&genuine, 2), NOW).unwrap();
        assert_eq!((m.tree_id, &m.payload[..]), (a.tree_id(), &b"drill"[..]));
        assert_eq!(targets, vec![1]);

        // A later grant of a third tree covering the filter does not widen subscription 1
        // (nor 2): on resubscribe each compiles for its own tree only.
        let c = TreeKey::generate_with("later", &mut rng).unwrap();
        kr.write().unwrap().add_tree_key_at(&c, 0).unwrap();
        let again = core.resubscribe_all(NOW);
        assert_eq!(
            key_ids(core_frames(&again, &core, 1).as_slice()),
            vec![a.cert().keys().key_id()]
        );
        assert_eq!(
            key_ids(core_frames(&again, &core, 2).as_slice()),
            vec![b.cert().keys().key_id()]
        );
        let from_c = seal_in(&c, b"fire", &mut rng);
        assert!(core.receive(&at(&from_c, 3), NOW).is_none());
    }

    /// The `Sub` frames of `frames` that belong to local subscription `id`.
    fn core_frames(frames: &[Frame], core: &ClientCore, id: LocalSubId) -> Vec<Frame> {
        frames
            .iter()
            .filter(|f| matches!(f, Frame::Sub(s) if core.local_for(s.sub_id) == Some(id)))
            .cloned()
            .collect()
    }

    /// What a durable is owed is journalled when owed, stays saved while handed to a
    /// resumed subscription (a crash before the take must not lose it), and is journalled
    /// as paid only once taken; a restored owed message counts only while the window
    /// remembers it.
    #[test]
    fn owed_messages_are_saved_until_taken_and_restored_only_while_remembered() {
        use receive::Change;
        let mut core = ClientCore::new(Arc::new(RwLock::new(Keyring::new())));
        let owed = |d| Change::Owed {
            durable: "d".into(),
            digest: d,
        };
        core.dedup_untaken(7, Some("d"));
        assert_eq!(core.take_changes(), vec![owed(7)]);
        // Handed to the resumed durable: still owed in the file.
        assert!(core.owed.take("d", &7));
        assert!(core.take_changes().is_empty(), "handed, not yet paid");
        assert_eq!(core.owed_snapshot(), vec![("d".to_owned(), 7)]);
        // Dropped again untaken: owed as before, nothing new to write.
        core.dedup_untaken(7, Some("d"));
        assert!(core.take_changes().is_empty());
        assert!(core.owed.contains("d", &7));
        // Handed again and taken: paid.
        assert!(core.owed.take("d", &7));
        core.dedup_taken(7, Some("d"));
        let paid = Change::Paid {
            durable: "d".into(),
            digest: 7,
        };
        assert_eq!(core.take_changes(), vec![paid]);
        assert!(core.owed_snapshot().is_empty());
        assert_eq!((core.owed.owed_len, core.owed.handed.len()), (0, 0));
        // Taken again (another copy): nothing more.
        core.dedup_taken(7, Some("d"));
        assert!(core.take_changes().is_empty());
        // A deletion forgets the name.
        core.dedup_untaken(8, Some("d"));
        core.forget_owed("d");
        let forgotten = Change::OwedForgotten {
            durable: "d".into(),
        };
        assert_eq!(core.take_changes(), vec![owed(8), forgotten]);
        assert_eq!((core.owed.owed_len, core.owed.handed.len()), (0, 0));
        // Restored: only what the window remembers.
        let now = 1_000_000;
        core.guard_mut().restore_digest(9, now + 60_000, now);
        assert!(core.restore_owed("d", 9));
        assert!(!core.restore_owed("d", 10), "not in the window: not owed");
        assert_eq!(core.owed_snapshot(), vec![("d".to_owned(), 9)]);
        assert!(
            core.take_changes().is_empty(),
            "restored entries are not written again"
        );
    }
}
