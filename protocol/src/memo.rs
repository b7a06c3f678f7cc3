//! A memo of per-topic key derivations, kept by each [`crate::Sealer`] and
//! [`crate::Opener`] (one per thread or connection).
//!
//! Sealing or opening a message on a topic derives the same values every time: the topic's
//! routing tokens (one keyed hash per level, from the epoch's routing key), its message key
//! M(t) (a keyed hash per level below the grant's scope) and, when opening, the check that
//! the decrypted name is a valid topic. Measured with `whispeer bench` (TCP, 1 KiB, one
//! topic) these were about 9 % of the clients' CPU. Each entry here is a pure function of
//! the inputs it keeps beside it — the topic's exact name, the epoch keys, the grant's scope
//! and key — and those inputs are compared in full before an entry is used, so a memo hit
//! gives exactly what deriving again would: which grant or epoch applies is still decided
//! by the keyring on every message (a grant added, an epoch superseded or a delegated grant
//! outranked changes the inputs, and so misses). Bounded: at most [`MEMO_TOPICS`] topics,
//! then it starts over.

use crate::kdf::Secret32;
use crate::token::TopicToken;
use crate::topic::Topic;
use crate::tree::{EpochKeys, Grant, Scope};

/// Topics remembered before the memo is emptied (a flood of new topics costs what it did
/// without a memo, and memory stays bounded).
pub(crate) const MEMO_TOPICS: usize = 256;

#[derive(Default)]
struct Entry {
    topic: Option<Topic>,
    /// The epoch keys the tokens were derived with, and the tokens.
    tokens: Option<(EpochKeys, Vec<TopicToken>)>,
    /// The grant's scope and key M(t) was derived from, and M(t).
    message_key: Option<(Scope, Secret32, Secret32)>,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct KeyMemo {
    by_name: crate::keyring::FastMap<String, Entry>,
}

impl KeyMemo {
    fn entry(&mut self, name: &str) -> &mut Entry {
        if !self.by_name.contains_key(name) {
            if self.by_name.len() >= MEMO_TOPICS {
                self.by_name.clear();
            }
            self.by_name.insert(name.to_owned(), Entry::default());
        }
        self.by_name.get_mut(name).expect("just inserted")
    }

    /// `Topic::new(name)`, remembered once valid (an invalid name is not kept).
    pub(crate) fn topic(&mut self, name: &str) -> Option<Topic> {
        if let Some(t) = self.by_name.get(name).and_then(|e| e.topic.as_ref()) {
            return Some(t.clone());
        }
        let t = Topic::new(name).ok()?;
        self.entry(name).topic = Some(t.clone());
        Some(t)
    }

    /// `keys.tokens(topic)`.
    pub(crate) fn tokens(&mut self, keys: &EpochKeys, topic: &Topic) -> &[TopicToken] {
        let e = self.entry(topic.as_str());
        if !matches!(&e.tokens, Some((k, _)) if k == keys) {
            e.tokens = Some((keys.clone(), keys.tokens(topic)));
        }
        &e.tokens.as_ref().expect("just set").1
    }

    /// `grant.message_key(topic)`.
    pub(crate) fn message_key(&mut self, grant: &Grant, topic: &Topic) -> Option<Secret32> {
        let e = self.entry(topic.as_str());
        if let Some((scope, key, m)) = &e.message_key {
            if scope == grant.scope() && key == grant.secret() {
                return Some(m.clone());
            }
        }
        let m = grant.message_key(topic)?;
        e.message_key = Some((grant.scope().clone(), grant.secret().clone(), m.clone()));
        Some(m)
    }
}
