//! The grants a client holds, indexed for the two questions it asks on every message:
//! "which key seals topic t?" and "which epoch does this key id name, and is it still
//! accepted?".
//!
//! Epochs: a client publishes with the newest epoch it holds for a tree and accepts the
//! previous one for a grace period after the newer one arrived (so messages in flight
//! during a rotation still open). Older epochs are dropped.

use std::collections::{BTreeMap, HashMap};

use crate::error_keys::KeyError;
use crate::identity::SenderId;
use crate::kdf::Secret32;
use crate::token::{KeyId, TokenPattern, TopicToken};
use crate::topic::{Topic, TopicFilter};
use crate::tree::{EpochKeys, Grant, TreeId, TreeKey};

/// Default grace period for the previous epoch after a rotation: 24 hours.
pub const DEFAULT_EPOCH_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug)]
struct EpochEntry {
    keys: EpochKeys,
    grants: Vec<Grant>,
    superseded_at_ms: Option<u64>,
}

#[derive(Debug)]
struct TreeEntry {
    admin: SenderId,
    name: String,
    epochs: BTreeMap<u64, EpochEntry>,
    /// When the newest epoch was first seen: the start of the previous epoch's grace.
    rotated_at_ms: u64,
}

impl TreeEntry {
    fn current(&self) -> Option<(&u64, &EpochEntry)> {
        self.epochs.iter().next_back()
    }
}

/// Everything needed to seal on one topic: the epoch keys, the topic's tokens (computed
/// once) and its message key. Cache it per topic.
#[derive(Clone, Debug)]
pub struct TopicKey {
    pub(crate) keys: EpochKeys,
    pub(crate) topic: Topic,
    pub(crate) tokens: Vec<TopicToken>,
    pub(crate) message_key: Secret32,
}

impl TopicKey {
    /// Builds the sealing key of `topic` from a grant that covers it.
    pub fn from_grant(grant: &Grant, topic: &Topic) -> Result<Self, KeyError> {
        let message_key = grant
            .message_key(topic)
            .ok_or_else(|| KeyError::NoKeyForTopic {
                topic: topic.to_string(),
            })?;
        let keys = grant.epoch_keys().clone();
        Ok(TopicKey {
            tokens: keys.tokens(topic),
            keys,
            topic: topic.clone(),
            message_key,
        })
    }
    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }
    /// The epoch keys used.
    pub fn epoch_keys(&self) -> &EpochKeys {
        &self.keys
    }
}

/// The set of grants a client holds.
#[derive(Debug)]
pub struct Keyring {
    trees: HashMap<TreeId, TreeEntry>,
    by_key_id: HashMap<KeyId, (TreeId, u64)>,
    grace_ms: u64,
}

impl Default for Keyring {
    fn default() -> Self {
        Self::new()
    }
}

impl Keyring {
    /// An empty keyring with the default epoch grace period.
    pub fn new() -> Self {
        Self::with_grace(DEFAULT_EPOCH_GRACE_MS)
    }

    /// An empty keyring accepting the previous epoch for `grace_ms` after a rotation.
    pub fn with_grace(grace_ms: u64) -> Self {
        Keyring {
            trees: HashMap::new(),
            by_key_id: HashMap::new(),
            grace_ms,
        }
    }

    /// Adds a grant. The first grant of a tree pins its admin key; later grants must be
    /// signed by the same admin. A grant of a newer epoch starts the grace period of the
    /// current one and drops anything older than that.
    pub fn add_grant(&mut self, grant: Grant, now_ms: u64) -> Result<(), KeyError> {
        let cert = grant.cert();
        let keys = cert.keys().clone();
        let tree_id = keys.tree_id();
        let epoch = keys.epoch();
        let tree = self.trees.entry(tree_id).or_insert_with(|| TreeEntry {
            admin: cert.admin(),
            name: cert.tree_name().to_owned(),
            epochs: BTreeMap::new(),
            rotated_at_ms: now_ms,
        });
        if tree.admin != cert.admin() {
            return Err(KeyError::AdminMismatch {
                tree: tree_id.to_string(),
            });
        }
        let current = tree.current().map(|(e, _)| *e);
        let oldest = tree.epochs.keys().next().copied();
        if let (Some(_), Some(oldest)) = (current, oldest) {
            if epoch < oldest {
                // Older than the previous epoch: no longer accepted, nothing to add.
                return Ok(());
            }
        }
        if let Some(cur) = current.filter(|c| epoch > *c) {
            // Rotation: the old current epoch enters its grace period now; anything older
            // goes (also when several epochs were skipped).
            tree.rotated_at_ms = now_ms;
            for (e, old) in tree.epochs.iter_mut() {
                if *e <= cur && old.superseded_at_ms.is_none() {
                    old.superseded_at_ms = Some(now_ms);
                }
            }
            let drop: Vec<u64> = tree.epochs.keys().copied().filter(|e| *e < cur).collect();
            for e in drop {
                if let Some(old) = tree.epochs.remove(&e) {
                    self.by_key_id.remove(&old.keys.key_id());
                }
            }
        }
        // A late grant for an older epoch keeps the grace that started at the rotation.
        let superseded = current.filter(|c| *c > epoch).map(|_| tree.rotated_at_ms);
        let entry = tree.epochs.entry(epoch).or_insert_with(|| EpochEntry {
            keys: keys.clone(),
            grants: Vec::new(),
            superseded_at_ms: superseded,
        });
        if !entry.grants.iter().any(|g| g.scope() == grant.scope()) {
            entry.grants.push(grant);
        }
        self.by_key_id.insert(keys.key_id(), (tree_id, epoch));
        Ok(())
    }

    /// Adds the whole-tree grant of an admin key.
    pub fn add_tree_key(&mut self, tree: &TreeKey, now_ms: u64) -> Result<(), KeyError> {
        self.add_grant(tree.grant_all(), now_ms)
    }

    /// The epoch keys a key id names, if that epoch is accepted at `now_ms`.
    pub fn epoch(&self, key_id: &KeyId, now_ms: u64) -> Option<&EpochKeys> {
        self.entry(key_id, now_ms).map(|e| &e.keys)
    }

    fn entry(&self, key_id: &KeyId, now_ms: u64) -> Option<&EpochEntry> {
        let (tree, epoch) = self.by_key_id.get(key_id)?;
        let e = self.trees.get(tree)?.epochs.get(epoch)?;
        match e.superseded_at_ms {
            Some(t) if now_ms > t.saturating_add(self.grace_ms) => None,
            _ => Some(e),
        }
    }

    /// `M(topic)` in the epoch `key_id` names, from the most specific grant held for it.
    pub(crate) fn message_key(
        &self,
        key_id: &KeyId,
        topic: &Topic,
        now_ms: u64,
    ) -> Option<Secret32> {
        let e = self.entry(key_id, now_ms)?;
        e.grants
            .iter()
            .filter(|g| g.scope().covers(topic))
            .max_by_key(|g| g.scope().specificity())
            .and_then(|g| g.message_key(topic))
    }

    /// The grant that seals `topic`: the newest epoch of the tree whose grant covers the
    /// topic most specifically. Fails when none does, or when two trees tie.
    pub fn grant_for(&self, topic: &Topic) -> Result<&Grant, KeyError> {
        let mut best: Option<&Grant> = None;
        let mut tie = false;
        for tree in self.trees.values() {
            let Some((_, cur)) = tree.current() else {
                continue;
            };
            let g = cur
                .grants
                .iter()
                .filter(|g| g.scope().covers(topic))
                .max_by_key(|g| g.scope().specificity());
            if let Some(g) = g {
                match best {
                    Some(b) if b.scope().specificity() > g.scope().specificity() => {}
                    Some(b) if b.scope().specificity() == g.scope().specificity() => tie = true,
                    _ => {
                        best = Some(g);
                        tie = false;
                    }
                }
            }
        }
        match best {
            Some(_) if tie => Err(KeyError::AmbiguousTree {
                topic: topic.to_string(),
            }),
            Some(g) => Ok(g),
            None => Err(KeyError::NoKeyForTopic {
                topic: topic.to_string(),
            }),
        }
    }

    /// The sealing key for `topic` (see [`Keyring::grant_for`]).
    pub fn topic_key(&self, topic: &Topic) -> Result<TopicKey, KeyError> {
        TopicKey::from_grant(self.grant_for(topic)?, topic)
    }

    /// The token patterns to subscribe with for `filter`: one per accepted epoch of every
    /// tree holding a grant that some matching topic could fall under.
    pub fn compile(&self, filter: &TopicFilter, now_ms: u64) -> Vec<TokenPattern> {
        let mut out = Vec::new();
        for tree in self.trees.values() {
            for e in tree.epochs.values() {
                if self.entry(&e.keys.key_id(), now_ms).is_none() {
                    continue;
                }
                if e.grants.iter().any(|g| g.scope().intersects(filter)) {
                    out.push(e.keys.compile(filter));
                }
            }
        }
        out
    }

    /// The trees held: (id, name, newest epoch, admin).
    pub fn trees(&self) -> impl Iterator<Item = (TreeId, &str, u64, SenderId)> + '_ {
        self.trees.iter().filter_map(|(id, t)| {
            t.current()
                .map(|(e, _)| (*id, t.name.as_str(), *e, t.admin))
        })
    }

    /// Every grant held, of every accepted epoch.
    pub fn grants(&self) -> impl Iterator<Item = &Grant> + '_ {
        self.trees
            .values()
            .flat_map(|t| t.epochs.values().flat_map(|e| e.grants.iter()))
    }

    /// True when no grant is held.
    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Scope;
    use rand_chacha::rand_core::SeedableRng;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn most_specific_grant_and_epoch_grace() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let tk = TreeKey::generate("home", &mut rng).unwrap();
        let mut kr = Keyring::with_grace(1000);
        kr.add_grant(tk.grant(&Scope::Subtree(t("a"))), 0).unwrap();
        kr.add_grant(tk.grant(&Scope::Topic(t("a/b"))), 0).unwrap();
        assert_eq!(
            kr.grant_for(&t("a/b")).unwrap().scope(),
            &Scope::Topic(t("a/b"))
        );
        assert_eq!(
            kr.grant_for(&t("a/c")).unwrap().scope(),
            &Scope::Subtree(t("a"))
        );
        assert!(matches!(
            kr.grant_for(&t("b")),
            Err(KeyError::NoKeyForTopic { .. })
        ));

        let old_id = tk.cert().keys().key_id();
        let tk1 = tk.rotate(&mut rng);
        kr.add_grant(tk1.grant_all(), 5000).unwrap();
        assert_eq!(kr.grant_for(&t("z")).unwrap().epoch_keys().epoch(), 1);
        assert!(
            kr.epoch(&old_id, 5500).is_some(),
            "previous epoch accepted within grace"
        );
        assert!(kr.epoch(&old_id, 6001).is_none(), "and not after");
        assert_eq!(kr.compile(&TopicFilter::new("a/#").unwrap(), 5500).len(), 2);
        assert_eq!(kr.compile(&TopicFilter::new("a/#").unwrap(), 7000).len(), 1);

        // Epoch 2 drops epoch 0 entirely; epoch 1 enters its grace.
        let e1 = tk1.cert().keys().key_id();
        let tk2 = tk1.rotate(&mut rng);
        kr.add_grant(tk2.grant_all(), 8000).unwrap();
        assert!(kr.epoch(&old_id, 5500).is_none());
        assert!(kr.epoch(&e1, 8500).is_some());
        // Jumping from epoch 2 to 5 still keeps epoch 2 for the grace period.
        let e2 = tk2.cert().keys().key_id();
        let tk5 = tk2.rotate(&mut rng).rotate(&mut rng).rotate(&mut rng);
        kr.add_grant(tk5.grant_all(), 9000).unwrap();
        assert!(kr.epoch(&e2, 9500).is_some());
        assert!(kr.epoch(&e1, 9500).is_none());
        // A late grant for epoch 2 does not restart its grace.
        kr.add_grant(tk2.grant(&Scope::Subtree(t("late"))), 9900)
            .unwrap();
        assert!(kr.epoch(&e2, 10_001).is_none());
    }

    #[test]
    fn admin_is_pinned() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let tk = TreeKey::generate("home", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key(&tk, 0).unwrap();
        // Same tree id, different admin: forged by someone else.
        let other = TreeKey::generate("home", &mut rng).unwrap();
        let forged = crate::tree::tests_support::with_tree_id(&other, tk.tree_id());
        assert!(matches!(
            kr.add_tree_key(&forged, 0),
            Err(KeyError::AdminMismatch { .. })
        ));
    }
}
