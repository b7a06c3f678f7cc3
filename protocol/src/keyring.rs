//! The grants a client holds, indexed for the two questions it asks on every message:
//! "which key seals topic t?" and "which epoch does this key id name, and is this message
//! still accepted?".
//!
//! Trust (PROTOCOL.md §5.8): the first certificate of a tree pins its admin (and whether it
//! is a passphrase tree); pins can be exported and imported so they survive restarts. Each
//! held grant has a [`Provenance`]; a grant whose key contradicts one the keyring can derive
//! from a grant it holds is refused, and a verified broader grant arriving later drops the
//! unverified narrower grants it contradicts. Delegated grants open messages but seal only
//! after [`Keyring::allow_sealing`].
//!
//! Epochs: a client publishes with the newest epoch it holds for a tree. A message of an
//! earlier epoch is accepted only if dated before the cutoff in the newer epoch's
//! certificate, and, when live, only within the grace period after the newer epoch arrived.
//! A message dated after its epoch's `not_after_ms` is refused. Epochs older than the
//! previous one are dropped.

use std::collections::{BTreeMap, HashMap};

/// The keyring's maps hash with foldhash (randomly seeded) instead of SipHash: opening a
/// message looked its key id up nine times (callgrind, `whispeer bench` 1→1: ~1,800 of the
/// clients' ~80,000 instructions per message). A keyed SipHash guards a map against
/// entries chosen to collide; these hold only what verified grants and certificates put in
/// (a stranger's key id is looked up and missed, never inserted), and the key memo is
/// emptied at 256 topics, so collisions could cost little.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use crate::dict::{DictId, Dictionaries, Dictionary};
use crate::error_keys::KeyError;
use crate::identity::SenderId;
use crate::invite::Invite;
use crate::kdf::Secret32;
use crate::memo::KeyMemo;
use crate::text::Cursor;
use crate::token::{KeyId, TokenPattern, TopicToken};
use crate::topic::{Topic, TopicFilter};
use crate::tree::{EpochKeys, Grant, Provenance, Scope, TreeId, TreeKey};

/// Default grace period for the previous epoch after a rotation: 24 hours.
pub const DEFAULT_EPOCH_GRACE_MS: u64 = 24 * 60 * 60 * 1000;
const PINS_FORMAT: u8 = 1;
/// Supersede times a keyring keeps per tree for epochs it does not hold superseded (saved
/// by an earlier run, [`Keyring::restore_superseded`]): those of the newest epochs only.
/// A keyring holds at most the previous epoch(s) of a rotation superseded, so a few
/// suffice for any order in which a later run adds its grants.
const SUPERSEDED_KEPT_PER_TREE: usize = 8;
const PIN_FLAG_PASSPHRASE: u8 = 0x01;
/// Most zstd dictionaries (distinct ids) a keyring holds: a bound on the memory a member
/// can make a victim spend by sending invites that each carry new dictionaries (256 of the
/// largest, 112 KiB, are 28 MiB). Beyond it [`KeyError::TooManyDictionaries`].
pub const MAX_DICTIONARIES: usize = 256;

#[derive(Debug)]
struct Held {
    grant: Grant,
    provenance: Provenance,
    /// The caller opted in to sealing with this (delegated) grant.
    allow_sealing: bool,
}

impl Held {
    fn sealable(&self) -> bool {
        self.allow_sealing || self.provenance.is_verified()
    }
}

#[derive(Debug)]
struct EpochEntry {
    keys: EpochKeys,
    /// The most restrictive values of every certificate of this epoch seen.
    prev_cutoff_ms: u64,
    not_after_ms: Option<u64>,
    grants: Vec<Held>,
    superseded_at_ms: Option<u64>,
}

#[derive(Debug)]
struct TreeEntry {
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

/// The pinned admin of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The admin key every certificate of the tree must be signed by.
    pub admin: SenderId,
    /// A passphrase tree (only epoch 0 is accepted).
    pub passphrase: bool,
}

/// A grant dropped because a verified grant that arrived later contradicts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedGrant {
    /// The tree.
    pub tree_id: TreeId,
    /// The epoch.
    pub epoch: u64,
    /// The dropped grant's scope.
    pub scope: Scope,
    /// Its provenance.
    pub provenance: Provenance,
    /// The scope of the verified grant that contradicts it.
    pub contradicted_by: Scope,
}

/// Why a grant was ignored: valid, but nothing was added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// The grant's epoch is older than the oldest epoch the keyring holds of its tree: a
    /// rotation the keyring already has superseded it (§5.8), so it is no longer accepted.
    EpochTooOld {
        /// The grant's epoch.
        epoch: u64,
        /// The oldest epoch held of the tree.
        oldest_held: u64,
    },
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ignored::EpochTooOld { epoch, oldest_held } => write!(
                f,
                "epoch {epoch} is older than the oldest epoch held of the tree ({oldest_held}): \
                 a rotation superseded it"
            ),
        }
    }
}

/// What [`Keyring::add_grant_report_at`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Added {
    /// The provenance the grant is held with (`None`: its epoch is no longer accepted, so
    /// nothing was added; [`Added::ignored`] says why).
    pub provenance: Option<Provenance>,
    /// Grants dropped because this one, verified, contradicts them.
    pub dropped: Vec<DroppedGrant>,
    /// Why nothing was added (`Some` exactly when `provenance` is `None`).
    pub ignored: Option<Ignored>,
}

/// What [`Keyring::accept_invite_at`] did: the outcome to show whoever accepts an invite.
/// It has the fields of [`Added`] (so code reading `provenance` and `dropped` reads them
/// here too) and says what else happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Accepted {
    /// The grant's tree.
    pub tree_id: TreeId,
    /// The grant's epoch.
    pub epoch: u64,
    /// The grant's scope.
    pub scope: Scope,
    /// The provenance the grant is held with; `None` when it was ignored (nothing added:
    /// neither the grant nor its dictionaries).
    pub provenance: Option<Provenance>,
    /// Why the grant was ignored.
    pub ignored: Option<Ignored>,
    /// Grants dropped because this one, verified, contradicts them.
    pub dropped: Vec<DroppedGrant>,
    /// Who sealed the invite.
    pub inviter: SenderId,
    /// The inviter is the tree's admin key ([`Invite::inviter_is_admin`]). When it is not, a
    /// member enrolled the caller: a member removed by a rotation can still hand out the
    /// old epoch's admin-signed grant, and the caller cannot see that a newer epoch exists —
    /// confirm with the admin that `epoch` is current (PROTOCOL §10).
    pub inviter_is_admin: bool,
    /// The invite's dictionaries the grant's tree could not use before (now added for it:
    /// §4.6.1, a tree's messages decode only with dictionaries that came with it), by
    /// ascending id.
    pub dictionaries_added: Vec<DictId>,
}

impl Accepted {
    /// The grant is held (it was not ignored).
    pub fn is_accepted(&self) -> bool {
        self.provenance.is_some()
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
    /// The zstd dictionaries that came with this key's tree (codec 3 finds its dictionary
    /// here or in `unbound`).
    pub(crate) dictionaries: Dictionaries,
    /// The keyring's dictionaries added without a tree ([`Keyring::add_dictionary`]).
    pub(crate) unbound: Dictionaries,
}

impl TopicKey {
    /// Builds the sealing key of `topic` from a grant that covers it (no provenance check:
    /// [`Keyring::topic_key`] is the checked way).
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
            dictionaries: Dictionaries::new(),
            unbound: Dictionaries::new(),
        })
    }
    /// The same key with these dictionaries (for [`crate::Compression::ZstdDict`]);
    /// [`Keyring::topic_key`] gives the keyring's for the key's tree.
    pub fn with_dictionaries(mut self, dictionaries: Dictionaries) -> Self {
        self.dictionaries = dictionaries;
        self.unbound = Dictionaries::new();
        self
    }
    /// The dictionary with this id, if this key may use it.
    pub(crate) fn dictionary(&self, id: &DictId) -> Option<&Dictionary> {
        self.dictionaries.get(id).or_else(|| self.unbound.get(id))
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

/// The key that opens one topic of one held epoch, and the provenance of the best grant
/// giving it.
pub(crate) struct OpenKey {
    pub(crate) key: Secret32,
    pub(crate) provenance: Provenance,
}

/// The set of grants a client holds.
#[derive(Debug)]
pub struct Keyring {
    trees: FastMap<TreeId, TreeEntry>,
    pins: FastMap<TreeId, Pin>,
    by_key_id: FastMap<KeyId, (TreeId, u64)>,
    grace_ms: u64,
    /// Every zstd dictionary held (what [`MAX_DICTIONARIES`] bounds).
    dictionaries: Dictionaries,
    /// Those added without a tree ([`Keyring::add_dictionary`]): the application's choice,
    /// used for every tree.
    unbound_dictionaries: Dictionaries,
    /// Those that came with a tree (an invite's, [`Keyring::add_dictionary_for`]): used for
    /// that tree's messages only (§4.6.1).
    tree_dictionaries: FastMap<TreeId, Dictionaries>,
    /// When epochs were superseded according to an earlier run (restored from the client's
    /// state, [`Keyring::restore_superseded`]), by tree and epoch: an epoch superseded in
    /// this run takes the earlier of the two, so a restart never restarts its grace.
    restored_superseded: FastMap<TreeId, BTreeMap<u64, u64>>,
}

/// The earlier of `t` and the supersede time an earlier run saved for (`tree`, `epoch`).
fn earliest(
    restored: &FastMap<TreeId, BTreeMap<u64, u64>>,
    tree: &TreeId,
    epoch: u64,
    t: u64,
) -> u64 {
    restored
        .get(tree)
        .and_then(|m| m.get(&epoch))
        .map_or(t, |r| t.min(*r))
}

impl Default for Keyring {
    fn default() -> Self {
        Self::new()
    }
}

/// Unix milliseconds from the system clock (0 before 1970).
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Keyring {
    /// An empty keyring with the default epoch grace period.
    pub fn new() -> Self {
        Self::with_grace(DEFAULT_EPOCH_GRACE_MS)
    }

    /// An empty keyring accepting live messages of the previous epoch for `grace_ms` after
    /// a rotation.
    pub fn with_grace(grace_ms: u64) -> Self {
        Keyring {
            trees: FastMap::default(),
            pins: FastMap::default(),
            by_key_id: FastMap::default(),
            grace_ms,
            dictionaries: Dictionaries::new(),
            unbound_dictionaries: Dictionaries::new(),
            tree_dictionaries: FastMap::default(),
            restored_superseded: FastMap::default(),
        }
    }

    /// Adds a grant now (the system clock); see [`Keyring::add_grant_report_at`]. Not on
    /// `wasm32-unknown-unknown`, which has no system clock: use [`Keyring::add_grant_at`].
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn add_grant(&mut self, grant: Grant) -> Result<(), KeyError> {
        self.add_grant_at(grant, wall_clock_ms())
    }

    /// Adds a grant at `now_ms` (Unix milliseconds; tests pass their own clock); see
    /// [`Keyring::add_grant_report_at`] (this drops the report).
    pub fn add_grant_at(&mut self, grant: Grant, now_ms: u64) -> Result<(), KeyError> {
        self.add_grant_report_at(grant, now_ms).map(|_| ())
    }

    /// Adds a grant.
    ///
    /// Refused, with the keyring unchanged: a certificate signed by another admin than the
    /// pinned one ([`KeyError::AdminMismatch`]) or with another passphrase flag
    /// ([`KeyError::PinMismatch`]); epoch > 0 of a passphrase tree
    /// ([`KeyError::PassphraseEpoch`]); an end (`not_after_ms`) on a passphrase tree
    /// ([`KeyError::InvalidString`]); a key id held for another tree or epoch
    /// ([`KeyError::KeyIdConflict`]); a certificate for a held epoch with another R or N
    /// ([`KeyError::EpochConflict`]; one that differs only in its name, cutoff or end is
    /// accepted, and the epoch keeps the smallest cutoff and the earliest end); a grant whose
    /// key contradicts a held grant
    /// ([`KeyError::Contradicts`]) — unless the new grant is admin-signed and the held one
    /// is not, in which case the held one is dropped and reported.
    ///
    /// The first grant of a tree pins its admin. A grant of a newer epoch starts the grace
    /// period of the current one and drops anything older than that.
    pub fn add_grant_report_at(&mut self, grant: Grant, now_ms: u64) -> Result<Added, KeyError> {
        let cert = grant.cert();
        let keys = cert.keys().clone();
        let tree_id = keys.tree_id();
        let epoch = keys.epoch();
        let new_pin = Pin {
            admin: cert.admin(),
            passphrase: cert.is_passphrase(),
        };
        if let Some(pin) = self.pins.get(&tree_id) {
            check_pin(&tree_id, pin, &new_pin)?;
        }
        if new_pin.passphrase && epoch > 0 {
            return Err(KeyError::PassphraseEpoch {
                tree: tree_id.to_string(),
                epoch,
            });
        }
        // Parsing refuses this already; checked again for grants built in memory, because an
        // end kept here would apply to every grant of the epoch (the earliest end wins).
        if new_pin.passphrase && cert.not_after_ms().is_some() {
            return Err(crate::tree::passphrase_end_refused("epoch certificate"));
        }
        if let Some(&(t, e)) = self.by_key_id.get(&keys.key_id()) {
            if (t, e) != (tree_id, epoch) {
                return Err(KeyError::KeyIdConflict {
                    key_id: keys.key_id().to_string(),
                    held_tree: format!("{t} epoch {e}"),
                    new_tree: format!("{tree_id} epoch {epoch}"),
                });
            }
        }
        let tree = self.trees.get(&tree_id);
        // Older than the previous epoch: no longer accepted, nothing to add.
        if let Some(t) = tree {
            if let (Some((_, _)), Some(oldest)) = (t.current(), t.epochs.keys().next()) {
                if epoch < *oldest {
                    return Ok(Added {
                        provenance: None,
                        dropped: Vec::new(),
                        ignored: Some(Ignored::EpochTooOld {
                            epoch,
                            oldest_held: *oldest,
                        }),
                    });
                }
            }
        }
        // Check the grant against the epoch's held grants (no change yet).
        let claimed = grant.claimed_provenance();
        let new_verified = claimed == Provenance::AdminSigned;
        let mut drop_idx = Vec::new();
        let mut provenance = claimed.clone();
        if let Some(entry) = tree.and_then(|t| t.epochs.get(&epoch)) {
            if entry.keys != keys {
                return Err(KeyError::EpochConflict {
                    tree: tree_id.to_string(),
                    epoch,
                });
            }
            for (i, h) in entry.grants.iter().enumerate() {
                let hs = h.grant.scope();
                let contradiction = if hs.contains(grant.scope()) {
                    let k = h.grant.key_for(grant.scope()).expect("contains");
                    if grant.same_key(&k) {
                        if hs != grant.scope()
                            && h.provenance.is_verified()
                            && provenance.rank() < Provenance::AdminSigned.rank()
                        {
                            provenance = Provenance::Derived { from: hs.clone() };
                        }
                        false
                    } else {
                        true
                    }
                } else if grant.scope().contains(hs) {
                    let k = grant.key_for(hs).expect("contains");
                    !h.grant.same_key(&k)
                } else {
                    false
                };
                if contradiction {
                    if new_verified && h.provenance != Provenance::AdminSigned {
                        drop_idx.push(i);
                    } else {
                        return Err(KeyError::Contradicts {
                            tree: tree_id.to_string(),
                            scope: grant.scope().to_string(),
                            held: hs.to_string(),
                        });
                    }
                }
            }
        }

        // Accepted: pin, rotate, insert.
        self.pins.entry(tree_id).or_insert(new_pin);
        let tree = self.trees.entry(tree_id).or_insert_with(|| TreeEntry {
            name: cert.tree_name().to_owned(),
            epochs: BTreeMap::new(),
            rotated_at_ms: now_ms,
        });
        let current = tree.current().map(|(e, _)| *e);
        if let Some(cur) = current.filter(|c| epoch > *c) {
            // Rotation: the old current epoch enters its grace period now; anything older
            // goes (also when several epochs were skipped).
            tree.rotated_at_ms = now_ms;
            for (e, old) in tree.epochs.iter_mut() {
                if *e <= cur && old.superseded_at_ms.is_none() {
                    old.superseded_at_ms =
                        Some(earliest(&self.restored_superseded, &tree_id, *e, now_ms));
                }
            }
            let drop: Vec<u64> = tree.epochs.keys().copied().filter(|e| *e < cur).collect();
            for e in drop {
                if let Some(old) = tree.epochs.remove(&e) {
                    self.by_key_id.remove(&old.keys.key_id());
                }
            }
        }
        // A late grant for an older epoch keeps the grace that started at the rotation (or
        // before, in an earlier run).
        let superseded = current.filter(|c| *c > epoch).map(|_| {
            earliest(
                &self.restored_superseded,
                &tree_id,
                epoch,
                tree.rotated_at_ms,
            )
        });
        let entry = tree.epochs.entry(epoch).or_insert_with(|| EpochEntry {
            keys: keys.clone(),
            prev_cutoff_ms: cert.prev_cutoff_ms(),
            not_after_ms: cert.not_after_ms(),
            grants: Vec::new(),
            superseded_at_ms: superseded,
        });
        entry.prev_cutoff_ms = entry.prev_cutoff_ms.min(cert.prev_cutoff_ms());
        entry.not_after_ms = match (entry.not_after_ms, cert.not_after_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut dropped = Vec::new();
        for i in drop_idx.into_iter().rev() {
            let h = entry.grants.remove(i);
            dropped.push(DroppedGrant {
                tree_id,
                epoch,
                scope: h.grant.scope().clone(),
                provenance: h.provenance,
                contradicted_by: grant.scope().clone(),
            });
        }
        let duplicate_of = entry
            .grants
            .iter()
            .position(|h| h.grant.scope() == grant.scope());
        let final_prov = match duplicate_of {
            Some(i) => {
                let h = &mut entry.grants[i];
                if provenance.rank() > h.provenance.rank() {
                    h.provenance = provenance;
                    h.grant = grant.clone();
                }
                h.provenance.clone()
            }
            None => {
                entry.grants.push(Held {
                    grant: grant.clone(),
                    provenance: provenance.clone(),
                    allow_sealing: false,
                });
                provenance
            }
        };
        // A verified grant confirms the delegated grants it contains.
        if final_prov.is_verified() {
            let from = grant.scope().clone();
            for h in entry.grants.iter_mut() {
                if matches!(h.provenance, Provenance::Delegated { .. })
                    && from.contains(h.grant.scope())
                    && &from != h.grant.scope()
                {
                    h.provenance = Provenance::Derived { from: from.clone() };
                }
            }
        }
        self.by_key_id.insert(keys.key_id(), (tree_id, epoch));
        Ok(Added {
            provenance: Some(final_prov),
            dropped,
            ignored: None,
        })
    }

    /// Adds the whole-tree grant of an admin key now (the system clock). Not on
    /// `wasm32-unknown-unknown`: use [`Keyring::add_tree_key_at`].
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn add_tree_key(&mut self, tree: &TreeKey) -> Result<(), KeyError> {
        self.add_tree_key_at(tree, wall_clock_ms())
    }

    /// Adds the whole-tree grant of an admin key at `now_ms` (Unix milliseconds).
    pub fn add_tree_key_at(&mut self, tree: &TreeKey, now_ms: u64) -> Result<(), KeyError> {
        self.add_grant_at(tree.grant_all(), now_ms)
    }

    /// Lets the keyring seal with the delegated grant(s) for `scope` in `tree_id` (every
    /// held epoch). Verified grants seal anyway.
    pub fn allow_sealing(&mut self, tree_id: TreeId, scope: &Scope) -> Result<(), KeyError> {
        let mut found = false;
        if let Some(t) = self.trees.get_mut(&tree_id) {
            for e in t.epochs.values_mut() {
                for h in e.grants.iter_mut().filter(|h| h.grant.scope() == scope) {
                    h.allow_sealing = true;
                    found = true;
                }
            }
        }
        if found {
            Ok(())
        } else {
            Err(KeyError::NoSuchGrant {
                tree: tree_id.to_string(),
                scope: scope.to_string(),
            })
        }
    }

    /// The epoch keys a key id names, if that epoch is accepted for live messages at
    /// `now_ms` (current, or previous within the grace period).
    pub fn epoch(&self, key_id: &KeyId, now_ms: u64) -> Option<&EpochKeys> {
        self.entry(key_id, now_ms).map(|e| &e.keys)
    }

    /// The epoch keys a key id names if the epoch is held at all (history may still hold
    /// messages of a previous epoch past its live grace).
    pub fn held_epoch(&self, key_id: &KeyId) -> Option<&EpochKeys> {
        self.held(key_id).map(|(_, e)| &e.keys)
    }

    fn held(&self, key_id: &KeyId) -> Option<(&TreeEntry, &EpochEntry)> {
        let (tree, epoch) = self.by_key_id.get(key_id)?;
        let t = self.trees.get(tree)?;
        Some((t, t.epochs.get(epoch)?))
    }

    fn entry(&self, key_id: &KeyId, now_ms: u64) -> Option<&EpochEntry> {
        let (_, e) = self.held(key_id)?;
        match e.superseded_at_ms {
            Some(t) if now_ms > t.saturating_add(self.grace_ms) => None,
            _ => Some(e),
        }
    }

    /// Is a message of the epoch `key_id` names, dated `ts_ms`, accepted at `now_ms`?
    ///
    /// - Refused when dated after its epoch's `not_after_ms`.
    /// - For an epoch the keyring holds a newer epoch of: refused when dated at or after the
    ///   smallest cutoff in the newer certificates; when `live`, also refused after the grace
    ///   period that started when the newer epoch arrived. From history (`live = false`)
    ///   the grace does not apply: only the cutoff.
    pub fn accepts_message(&self, key_id: &KeyId, ts_ms: u64, now_ms: u64, live: bool) -> bool {
        let Some((tree, e)) = self.held(key_id) else {
            return false;
        };
        if e.not_after_ms.is_some_and(|na| ts_ms > na) {
            return false;
        }
        let Some(superseded) = e.superseded_at_ms else {
            return true;
        };
        let epoch = e.keys.epoch();
        let cutoff = tree
            .epochs
            .range(epoch.saturating_add(1)..)
            .map(|(_, n)| n.prev_cutoff_ms)
            .min()
            .unwrap_or(0);
        if ts_ms >= cutoff {
            return false;
        }
        !(live && now_ms > superseded.saturating_add(self.grace_ms))
    }

    /// `M(topic)` in the epoch `key_id` names (if held), and the best provenance among the
    /// held grants covering it (they all give the same key: contradictions are refused).
    /// The grant is chosen here on every call; `memo` only spares deriving M(t) again from
    /// the same grant for the same topic.
    pub(crate) fn open_key_memo(
        &self,
        key_id: &KeyId,
        topic: &Topic,
        memo: &mut KeyMemo,
    ) -> Option<OpenKey> {
        let (_, e) = self.held(key_id)?;
        let h = e
            .grants
            .iter()
            .filter(|h| h.grant.scope().covers(topic))
            .max_by_key(|h| (h.provenance.rank(), h.grant.scope().specificity()))?;
        Some(OpenKey {
            key: memo.message_key(&h.grant, topic)?,
            provenance: h.provenance.clone(),
        })
    }

    fn best_sealing<'a>(tree: &'a TreeEntry, topic: &Topic) -> Result<Option<&'a Held>, KeyError> {
        let Some((_, cur)) = tree.current() else {
            return Ok(None);
        };
        let covering = || cur.grants.iter().filter(|h| h.grant.scope().covers(topic));
        if let Some(h) = covering()
            .filter(|h| h.sealable())
            .max_by_key(|h| h.grant.scope().specificity())
        {
            return Ok(Some(h));
        }
        match covering().max_by_key(|h| h.grant.scope().specificity()) {
            Some(h) => Err(KeyError::NotSealable {
                topic: topic.to_string(),
                scope: h.grant.scope().to_string(),
                by: h.provenance.to_string(),
            }),
            None => Ok(None),
        }
    }

    /// The grant that seals `topic`: in the one tree holding a sealable grant (verified, or
    /// delegated with [`Keyring::allow_sealing`]) covering the topic, the newest epoch's
    /// most specific such grant. Fails when none does ([`KeyError::NotSealable`] when only a
    /// delegated grant covers it), or when grants of two trees cover it, whatever their
    /// specificity ([`KeyError::AmbiguousTree`] names the trees: use
    /// [`Keyring::topic_key_in`]).
    pub fn grant_for(&self, topic: &Topic) -> Result<&Grant, KeyError> {
        let mut found: Vec<(&TreeId, &Held)> = Vec::new();
        let mut not_sealable = None;
        for (id, tree) in &self.trees {
            match Self::best_sealing(tree, topic) {
                Ok(Some(h)) => found.push((id, h)),
                Ok(None) => {}
                Err(e) => {
                    not_sealable.get_or_insert(e);
                }
            }
        }
        match found.len() {
            0 => Err(not_sealable.unwrap_or_else(|| KeyError::NoKeyForTopic {
                topic: topic.to_string(),
            })),
            1 => Ok(&found[0].1.grant),
            // Another tree's grant never wins silently, however specific: a second tree
            // (another admin) could otherwise capture a topic the caller meant for this one.
            _ => {
                let mut ids: Vec<String> = found.iter().map(|(id, _)| id.to_string()).collect();
                ids.sort();
                Err(KeyError::AmbiguousTree {
                    topic: topic.to_string(),
                    trees: ids.join(", "),
                })
            }
        }
    }

    /// The grant of tree `tree_id` that seals `topic` (see [`Keyring::grant_for`]).
    pub fn grant_in(&self, tree_id: TreeId, topic: &Topic) -> Result<&Grant, KeyError> {
        let none = || KeyError::NoKeyForTopic {
            topic: topic.to_string(),
        };
        let tree = self.trees.get(&tree_id).ok_or_else(none)?;
        Self::best_sealing(tree, topic)?
            .map(|h| &h.grant)
            .ok_or_else(none)
    }

    /// The sealing key for `topic` (see [`Keyring::grant_for`]).
    pub fn topic_key(&self, topic: &Topic) -> Result<TopicKey, KeyError> {
        let grant = self.grant_for(topic)?;
        Ok(self.with_tree_dictionaries(TopicKey::from_grant(grant, topic)?))
    }

    /// `key` with the dictionaries its tree may use.
    fn with_tree_dictionaries(&self, mut key: TopicKey) -> TopicKey {
        key.dictionaries = self.tree_dictionaries(key.keys.tree_id());
        key.unbound = self.unbound_dictionaries.clone();
        key
    }

    /// The dictionaries that came with tree `tree_id` (not those added without a tree).
    fn tree_dictionaries(&self, tree_id: TreeId) -> Dictionaries {
        self.tree_dictionaries
            .get(&tree_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The sealing key for `topic` in the named tree (when several trees cover it).
    pub fn topic_key_in(&self, tree_id: TreeId, topic: &Topic) -> Result<TopicKey, KeyError> {
        let grant = self.grant_in(tree_id, topic)?;
        Ok(self.with_tree_dictionaries(TopicKey::from_grant(grant, topic)?))
    }

    /// [`Keyring::topic_key`] (or [`Keyring::topic_key_in`] with a tree), deriving the
    /// tokens and M(t) through `memo`: the grant is chosen here on every call, exactly as
    /// there.
    pub(crate) fn topic_key_memo(
        &self,
        tree_id: Option<TreeId>,
        topic: &Topic,
        memo: &mut KeyMemo,
    ) -> Result<TopicKey, KeyError> {
        let grant = match tree_id {
            Some(t) => self.grant_in(t, topic)?,
            None => self.grant_for(topic)?,
        };
        let message_key =
            memo.message_key(grant, topic)
                .ok_or_else(|| KeyError::NoKeyForTopic {
                    topic: topic.to_string(),
                })?;
        let keys = grant.epoch_keys().clone();
        Ok(TopicKey {
            tokens: memo.tokens(&keys, topic).to_vec(),
            dictionaries: self.tree_dictionaries(keys.tree_id()),
            keys,
            topic: topic.clone(),
            unbound: self.unbound_dictionaries.clone(),
            message_key,
        })
    }

    /// Adds a zstd dictionary (§4.6.1) for every tree: messages of any tree naming its id
    /// open, and topics whose compression names it seal with it. `false` if it was already
    /// held so, or if the keyring holds [`MAX_DICTIONARIES`] already
    /// ([`Keyring::try_add_dictionary`] tells the two apart).
    ///
    /// A dictionary added without a tree is the application's choice (a `wsdict` line of a
    /// key file, `--dict`): it decodes every tree's messages, so a member of one tree who
    /// learns its id can make a message of her tree copy bytes out of it. Name the tree it
    /// belongs to with [`Keyring::add_dictionary_for`] when the keyring holds several trees;
    /// an invite's dictionaries are added for the invite's tree.
    pub fn add_dictionary(&mut self, d: Dictionary) -> bool {
        self.try_add_dictionary(d).unwrap_or(false)
    }

    /// [`Keyring::add_dictionary`], failing with [`KeyError::TooManyDictionaries`] (keyring
    /// unchanged) when it would hold more than [`MAX_DICTIONARIES`].
    pub fn try_add_dictionary(&mut self, d: Dictionary) -> Result<bool, KeyError> {
        if self.unbound_dictionaries.get(&d.id()).is_some() {
            return Ok(false);
        }
        if self.dictionaries.get(&d.id()).is_none() {
            self.check_dictionary_room(1)?;
            self.dictionaries.insert(d.clone());
        }
        Ok(self.unbound_dictionaries.insert(d))
    }

    /// Adds a zstd dictionary for tree `tree_id` only (§4.6.1): it decodes that tree's
    /// messages and seals its topics, never another tree's. A dictionary may be added for
    /// several trees (held once). `false` if this tree could use it already (added for it,
    /// or without a tree); [`KeyError::TooManyDictionaries`] beyond [`MAX_DICTIONARIES`].
    pub fn add_dictionary_for(&mut self, tree_id: TreeId, d: Dictionary) -> Result<bool, KeyError> {
        if self.dictionary_for(tree_id, &d.id()).is_some() {
            return Ok(false);
        }
        if self.dictionaries.get(&d.id()).is_none() {
            self.check_dictionary_room(1)?;
            self.dictionaries.insert(d.clone());
        }
        Ok(self.tree_dictionaries.entry(tree_id).or_default().insert(d))
    }

    /// The dictionary with this id that messages of tree `tree_id` may use: one that came
    /// with that tree, or one added without a tree.
    pub fn dictionary_for(&self, tree_id: TreeId, id: &DictId) -> Option<&Dictionary> {
        self.tree_dictionaries
            .get(&tree_id)
            .and_then(|m| m.get(id))
            .or_else(|| self.unbound_dictionaries.get(id))
    }

    /// Refuses `more` new dictionaries beyond [`MAX_DICTIONARIES`].
    fn check_dictionary_room(&self, more: usize) -> Result<(), KeyError> {
        let held = self.dictionaries.len();
        if held.saturating_add(more) > MAX_DICTIONARIES {
            return Err(KeyError::TooManyDictionaries {
                held,
                adding: more,
                max: MAX_DICTIONARIES,
            });
        }
        Ok(())
    }

    /// Accepts an opened invite (§7): adds its grant as [`Keyring::add_grant_report_at`]
    /// does, then the zstd dictionaries it carries, and says what it did.
    ///
    /// Nothing is added — no dictionary either — when the grant is refused (an error, the
    /// keyring unchanged), when it is ignored (`Ok`, [`Accepted::ignored`] says why: its
    /// epoch is older than every epoch held of its tree), or when its new dictionaries
    /// would make the keyring hold more than [`MAX_DICTIONARIES`]
    /// ([`KeyError::TooManyDictionaries`]). Whether to trust `invite.inviter` is the
    /// caller's decision, made before.
    pub fn accept_invite_at(&mut self, invite: &Invite, now_ms: u64) -> Result<Accepted, KeyError> {
        let keys = invite.grant.epoch_keys();
        let tree_id = keys.tree_id();
        let unheld = invite
            .dictionaries
            .iter()
            .filter(|d| self.dictionaries.get(&d.id()).is_none())
            .count();
        self.check_dictionary_room(unheld)?;
        let added = self.add_grant_report_at(invite.grant.clone(), now_ms)?;
        let mut dictionaries_added = Vec::new();
        if added.provenance.is_some() {
            for d in &invite.dictionaries {
                // Room was checked above: the grant adds no dictionary.
                if self.add_dictionary_for(tree_id, d.clone())? {
                    dictionaries_added.push(d.id());
                }
            }
        }
        Ok(Accepted {
            tree_id,
            epoch: keys.epoch(),
            scope: invite.grant.scope().clone(),
            provenance: added.provenance,
            ignored: added.ignored,
            dropped: added.dropped,
            dictionaries_added,
            inviter: invite.inviter,
            inviter_is_admin: invite.inviter_is_admin(),
        })
    }

    /// [`Keyring::accept_invite_at`] now (the system clock). Not on
    /// `wasm32-unknown-unknown`: use [`Keyring::accept_invite_at`].
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn accept_invite(&mut self, invite: &Invite) -> Result<Accepted, KeyError> {
        self.accept_invite_at(invite, wall_clock_ms())
    }

    /// Drops a dictionary (for every tree); `true` if it was held.
    pub fn remove_dictionary(&mut self, id: &DictId) -> bool {
        self.unbound_dictionaries.remove(id);
        for m in self.tree_dictionaries.values_mut() {
            m.remove(id);
        }
        self.tree_dictionaries.retain(|_, m| !m.is_empty());
        self.dictionaries.remove(id)
    }

    /// The dictionary with this id, whichever tree it came with
    /// ([`Keyring::dictionary_for`] is what a tree's messages may use).
    pub fn dictionary(&self, id: &DictId) -> Option<&Dictionary> {
        self.dictionaries.get(id)
    }

    /// Every dictionary held, whichever tree it came with.
    pub fn dictionaries(&self) -> &Dictionaries {
        &self.dictionaries
    }

    /// The token patterns to subscribe with for `filter`: one per accepted epoch of every
    /// tree holding a grant that some matching topic could fall under. A subscription binds
    /// to one tree (PROTOCOL §4.11, receiving): [`Keyring::subscription_trees`] says which
    /// trees it could bind to, [`Keyring::compile_in`] compiles for one of them.
    pub fn compile(&self, filter: &TopicFilter, now_ms: u64) -> Vec<TokenPattern> {
        self.trees
            .values()
            .flat_map(|t| self.compile_tree(t, filter, Some(now_ms)))
            .collect()
    }

    /// Like [`Keyring::compile`], for a subscription that starts in history: one pattern
    /// per *held* epoch (the previous one too after its live grace), since history may hold
    /// its messages dated before the rotation cutoff ([`Keyring::accepts_message`] with
    /// `live = false`). Live messages of an epoch past its grace still fail to open.
    pub fn compile_history(&self, filter: &TopicFilter) -> Vec<TokenPattern> {
        self.trees
            .values()
            .flat_map(|t| self.compile_tree(t, filter, None))
            .collect()
    }

    /// [`Keyring::compile`] for the one tree `tree_id` (nothing when it is not held): a
    /// subscription bound to a tree subscribes only to that tree's messages, whatever
    /// grants of other trees cover its filter — now or later.
    pub fn compile_in(
        &self,
        tree_id: TreeId,
        filter: &TopicFilter,
        now_ms: u64,
    ) -> Vec<TokenPattern> {
        self.trees
            .get(&tree_id)
            .map(|t| self.compile_tree(t, filter, Some(now_ms)))
            .unwrap_or_default()
    }

    /// [`Keyring::compile_history`] for the one tree `tree_id`.
    pub fn compile_history_in(&self, tree_id: TreeId, filter: &TopicFilter) -> Vec<TokenPattern> {
        self.trees
            .get(&tree_id)
            .map(|t| self.compile_tree(t, filter, None))
            .unwrap_or_default()
    }

    /// The trees a subscription to `filter` could bind to, sorted: those holding a grant
    /// some matching topic could fall under, in an epoch accepted at `now_ms` (`Some`) or
    /// in any held epoch (`None`, a subscription that starts in history). More than one is
    /// ambiguous: the subscriber names the tree, as a publisher does
    /// ([`KeyError::AmbiguousTree`], PROTOCOL §4.11).
    pub fn subscription_trees(&self, filter: &TopicFilter, now_ms: Option<u64>) -> Vec<TreeId> {
        let mut ids: Vec<TreeId> = self
            .trees
            .iter()
            .filter(|(_, t)| !self.compile_tree(t, filter, now_ms).is_empty())
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }

    /// The subscription's patterns in one tree: one per epoch holding a grant that
    /// intersects `filter` — accepted at `now_ms` when given, else every held epoch.
    fn compile_tree(
        &self,
        tree: &TreeEntry,
        filter: &TopicFilter,
        now_ms: Option<u64>,
    ) -> Vec<TokenPattern> {
        tree.epochs
            .values()
            .filter(|e| now_ms.is_none_or(|now| self.entry(&e.keys.key_id(), now).is_some()))
            .filter(|e| e.grants.iter().any(|h| h.grant.scope().intersects(filter)))
            .map(|e| e.keys.compile(filter))
            .collect()
    }

    /// The trees held: (id, name, newest epoch, admin).
    pub fn trees(&self) -> impl Iterator<Item = (TreeId, &str, u64, SenderId)> + '_ {
        self.trees.iter().filter_map(|(id, t)| {
            let admin = self.pins.get(id)?.admin;
            t.current().map(|(e, _)| (*id, t.name.as_str(), *e, admin))
        })
    }

    /// Every grant held, of every accepted epoch.
    pub fn grants(&self) -> impl Iterator<Item = &Grant> + '_ {
        self.held_grants().map(|(g, _)| g)
    }

    /// Every grant held with its provenance.
    pub fn held_grants(&self) -> impl Iterator<Item = (&Grant, &Provenance)> + '_ {
        self.trees.values().flat_map(|t| {
            t.epochs
                .values()
                .flat_map(|e| e.grants.iter().map(|h| (&h.grant, &h.provenance)))
        })
    }

    /// The provenance of the grant for `scope` held in the newest epoch of `tree_id`.
    pub fn provenance(&self, tree_id: TreeId, scope: &Scope) -> Option<&Provenance> {
        let (_, e) = self.trees.get(&tree_id)?.current()?;
        e.grants
            .iter()
            .find(|h| h.grant.scope() == scope)
            .map(|h| &h.provenance)
    }

    /// True when no grant is held.
    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }

    /// The pinned admin of a tree.
    pub fn pin(&self, tree_id: TreeId) -> Option<Pin> {
        self.pins.get(&tree_id).copied()
    }

    /// Pins a tree's admin before any grant arrives (e.g. from an out-of-band check).
    pub fn add_pin(&mut self, tree_id: TreeId, pin: Pin) -> Result<(), KeyError> {
        if let Some(old) = self.pins.get(&tree_id) {
            return check_pin(&tree_id, old, &pin);
        }
        self.pins.insert(tree_id, pin);
        Ok(())
    }

    /// When each superseded epoch was superseded, for the client's persistence: `(tree,
    /// epoch, superseded_at_ms)`, sorted. Every epoch held superseded, and the times an
    /// earlier run saved ([`Keyring::restore_superseded`]) for epochs not held so now (the
    /// newest few per tree), the earlier time where both say. (Only the latter are capped:
    /// capping all, a run holding more superseded epochs than the cap — old grants added
    /// newest first — saved only the newest, and the next run gave the others a new grace.)
    ///
    /// Why it is saved (adversarial review, clients): the grace of the previous epoch starts
    /// when the keyring first sees the newer one, and a client adds its grants again at
    /// every start — so without it the grace restarted at every process start, and a
    /// receiver restarted now and then accepted live messages of the old epoch (from a
    /// removed member still holding its key) for as long as it kept restarting, bounded
    /// only by the cutoff.
    pub fn superseded_epochs(&self) -> Vec<(TreeId, u64, u64)> {
        let mut all: BTreeMap<(TreeId, u64), u64> = BTreeMap::new();
        for (tree, m) in &self.restored_superseded {
            for (e, t) in m {
                all.insert((*tree, *e), *t);
            }
        }
        for (tree, t) in &self.trees {
            for (e, entry) in &t.epochs {
                if let Some(at) = entry.superseded_at_ms {
                    let v = all.entry((*tree, *e)).or_insert(at);
                    *v = (*v).min(at);
                }
            }
        }
        let mut out: Vec<(TreeId, u64, u64)> = Vec::with_capacity(all.len());
        // Restored epochs not held, per tree, kept so far.
        let mut unheld: Option<(TreeId, usize)> = None;
        for ((tree, e), at) in all.into_iter().rev() {
            if !self.holds_superseded(&tree, e) {
                // Newest epochs first, per tree: the first few of each tree are kept.
                let n = match &mut unheld {
                    Some((t, n)) if *t == tree => n,
                    _ => &mut unheld.insert((tree, 0)).1,
                };
                if *n >= SUPERSEDED_KEPT_PER_TREE {
                    continue;
                }
                *n += 1;
            }
            out.push((tree, e, at));
        }
        out.reverse();
        out
    }

    /// Whether the keyring holds epoch `epoch` of `tree` superseded.
    fn holds_superseded(&self, tree: &TreeId, epoch: u64) -> bool {
        self.trees
            .get(tree)
            .and_then(|t| t.epochs.get(&epoch))
            .is_some_and(|e| e.superseded_at_ms.is_some())
    }

    /// Restores a supersede time saved by an earlier run ([`Keyring::superseded_epochs`]),
    /// at `now_ms`: epoch `epoch` of `tree_id` was superseded at `superseded_at_ms`. If the
    /// keyring holds that epoch superseded, its grace now runs from the earlier of the two
    /// times; if it becomes superseded later (grants added after this, in any order), from
    /// this time at the latest. Call it before or after adding grants.
    ///
    /// A saved time later than `now_ms` (the clock went backwards since, or the state was
    /// edited) is taken as the grace being over: how much time passed since the rotation
    /// is then unknown, and the safe choice is the one that never accepts the old epoch
    /// live for longer than its grace — not a new grace from now, which is what a restart
    /// gave before. (History of that epoch dated before the cutoff still opens; only live
    /// messages of it are refused.) It is kept as 0 and saved so.
    pub fn restore_superseded(
        &mut self,
        tree_id: TreeId,
        epoch: u64,
        superseded_at_ms: u64,
        now_ms: u64,
    ) {
        let at = if superseded_at_ms > now_ms {
            0
        } else {
            superseded_at_ms
        };
        let mut m = self
            .restored_superseded
            .remove(&tree_id)
            .unwrap_or_default();
        let v = m.entry(epoch).or_insert(at);
        *v = (*v).min(at);
        // The newest few not held superseded are kept; those held are saved anyway
        // (`superseded_epochs`), whatever their number.
        let unheld: Vec<u64> = m
            .keys()
            .copied()
            .filter(|e| !self.holds_superseded(&tree_id, *e))
            .collect();
        for e in unheld.iter().rev().skip(SUPERSEDED_KEPT_PER_TREE) {
            m.remove(e);
        }
        self.restored_superseded.insert(tree_id, m);
        if let Some(e) = self
            .trees
            .get_mut(&tree_id)
            .and_then(|t| t.epochs.get_mut(&epoch))
        {
            if let Some(s) = e.superseded_at_ms.as_mut() {
                *s = (*s).min(at);
            }
        }
    }

    /// Every pin as bytes, for the client's persistence:
    /// `0x01 ‖ u32be(n) ‖ n × (tree_id[16] ‖ admin[32] ‖ flags u8)`, sorted by tree id
    /// (flags bit 0: passphrase tree).
    pub fn export_pins(&self) -> Vec<u8> {
        let mut ids: Vec<&TreeId> = self.pins.keys().collect();
        ids.sort();
        let mut out = Vec::with_capacity(5 + ids.len() * 49);
        out.push(PINS_FORMAT);
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let p = &self.pins[id];
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&p.admin.to_bytes());
            out.push(if p.passphrase { PIN_FLAG_PASSPHRASE } else { 0 });
        }
        out
    }

    /// Imports pins exported by [`Keyring::export_pins`]. Refuses (changing nothing) bytes
    /// that do not parse or a pin that contradicts one held. Returns how many were new.
    pub fn import_pins(&mut self, bytes: &[u8]) -> Result<usize, KeyError> {
        let mut c = Cursor::new(bytes, "pins");
        let v = c.u8()?;
        if v != PINS_FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "pins",
                version: v,
            });
        }
        let n = u32::from_be_bytes(c.arr()?) as usize;
        let mut parsed: FastMap<TreeId, Pin> = FastMap::default();
        for _ in 0..n {
            let id = TreeId(c.arr()?);
            let admin = SenderId::from_bytes(&c.arr()?)?;
            let flags = c.u8()?;
            if flags & !PIN_FLAG_PASSPHRASE != 0 {
                return Err(KeyError::InvalidString {
                    kind: "pins",
                    reason: format!("unknown flags 0x{flags:02x}"),
                });
            }
            let pin = Pin {
                admin,
                passphrase: flags & PIN_FLAG_PASSPHRASE != 0,
            };
            // Against the pins held, and the file's own earlier entries: two contradicting
            // entries for one tree in one file were both taken, the last one winning.
            if let Some(old) = self.pins.get(&id) {
                check_pin(&id, old, &pin)?;
            }
            if let Some(old) = parsed.get(&id) {
                check_pin(&id, old, &pin)?;
            }
            parsed.insert(id, pin);
        }
        c.finish()?;
        let mut added = 0;
        for (id, pin) in parsed {
            if self.pins.insert(id, pin).is_none() {
                added += 1;
            }
        }
        Ok(added)
    }
}

fn check_pin(tree_id: &TreeId, pinned: &Pin, new: &Pin) -> Result<(), KeyError> {
    if pinned.admin != new.admin {
        return Err(KeyError::AdminMismatch {
            tree: tree_id.to_string(),
        });
    }
    if pinned.passphrase != new.passphrase {
        return Err(KeyError::PinMismatch {
            tree: tree_id.to_string(),
            reason: "the certificate's passphrase flag differs from the pinned one",
        });
    }
    Ok(())
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
    fn os_randomness_and_the_system_clock_need_no_arguments() {
        let (a, b) = (Identity::generate(), Identity::generate());
        assert_ne!(a.sender_id(), b.sender_id());
        let tree = TreeKey::generate("home").unwrap();
        assert_ne!(tree.tree_id(), TreeKey::generate("home").unwrap().tree_id());
        let mut kr = Keyring::new();
        kr.add_tree_key(&tree).unwrap();
        kr.add_grant(tree.grant(&Scope::Subtree(t("a")))).unwrap();
        assert!(kr.topic_key(&t("a/b")).is_ok());
        // Added "now": a message dated now is accepted, live.
        let key_id = tree.cert().keys().key_id();
        assert!(kr.accepts_message(&key_id, wall_clock_ms(), wall_clock_ms(), true));
    }

    #[test]
    fn most_specific_grant_and_epoch_grace() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let tk = TreeKey::generate_with("home", &mut rng).unwrap();
        let mut kr = Keyring::with_grace(1000);
        kr.add_grant_at(tk.grant(&Scope::Subtree(t("a"))), 0)
            .unwrap();
        kr.add_grant_at(tk.grant(&Scope::Topic(t("a/b"))), 0)
            .unwrap();
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
        let tk1 = tk.rotate(u64::MAX, &mut rng).unwrap();
        kr.add_grant_at(tk1.grant_all(), 5000).unwrap();
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
        let tk2 = tk1.rotate(u64::MAX, &mut rng).unwrap();
        kr.add_grant_at(tk2.grant_all(), 8000).unwrap();
        assert!(kr.epoch(&old_id, 5500).is_none());
        assert!(kr.epoch(&e1, 8500).is_some());
        // Jumping from epoch 2 to 5 still keeps epoch 2 for the grace period.
        let e2 = tk2.cert().keys().key_id();
        let tk5 = tk2
            .rotate(u64::MAX, &mut rng)
            .unwrap()
            .rotate(u64::MAX, &mut rng)
            .unwrap()
            .rotate(u64::MAX, &mut rng)
            .unwrap();
        kr.add_grant_at(tk5.grant_all(), 9000).unwrap();
        assert!(kr.epoch(&e2, 9500).is_some());
        assert!(kr.epoch(&e1, 9500).is_none());
        // A late grant for epoch 2 does not restart its grace.
        kr.add_grant_at(tk2.grant(&Scope::Subtree(t("late"))), 9900)
            .unwrap();
        assert!(kr.epoch(&e2, 10_001).is_none());
    }

    /// The grace of a superseded epoch runs from when any run of the client first saw it
    /// superseded: a keyring that adds its grants again at a restart (so sees the rotation
    /// "now") takes the saved time, whether it is restored before or after the grants,
    /// through a late grant too; a saved time in the future counts as the grace over.
    #[test]
    fn a_restored_supersede_time_keeps_the_grace_from_restarting() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(40);
        let tk = TreeKey::generate_with("home", &mut rng).unwrap();
        let tk1 = tk.rotate(u64::MAX, &mut rng).unwrap();
        let (old, id) = (tk.cert().keys().key_id(), tk.tree_id());
        let live = |kr: &Keyring, now| kr.accepts_message(&old, 0, now, true);
        // The first run sees the rotation at 5000.
        let mut first = Keyring::with_grace(1000);
        first.add_tree_key_at(&tk, 0).unwrap();
        first.add_tree_key_at(&tk1, 5000).unwrap();
        let saved = first.superseded_epochs();
        assert_eq!(saved, [(id, 0, 5000)]);
        // A restart at 5600 adds both epochs again; the saved time is restored after them...
        let mut after = Keyring::with_grace(1000);
        after.add_tree_key_at(&tk, 5600).unwrap();
        after.add_tree_key_at(&tk1, 5600).unwrap();
        assert!(live(&after, 6001), "unrestored: a new grace from 5600");
        after.restore_superseded(id, 0, 5000, 5600);
        assert!(live(&after, 6000) && !live(&after, 6001), "the first grace");
        assert_eq!(after.superseded_epochs(), saved);
        // ...or before them.
        let mut before = Keyring::with_grace(1000);
        before.restore_superseded(id, 0, 5000, 5600);
        before.add_tree_key_at(&tk, 5600).unwrap();
        before.add_tree_key_at(&tk1, 5600).unwrap();
        assert!(live(&before, 6000) && !live(&before, 6001));
        // A late grant (epoch 1 after epoch 2, both superseding 0) keeps the saved time too.
        let tk2 = tk1.rotate(u64::MAX, &mut rng).unwrap();
        let e1 = tk1.cert().keys().key_id();
        let mut skip = Keyring::with_grace(1000);
        skip.add_tree_key_at(&tk, 0).unwrap();
        skip.add_tree_key_at(&tk2, 5000).unwrap();
        skip.add_tree_key_at(&tk1, 5100).unwrap();
        let saved_skip = skip.superseded_epochs();
        assert_eq!(saved_skip, [(id, 0, 5000), (id, 1, 5000)]);
        let mut late = Keyring::with_grace(1000);
        for (t, e, at) in saved_skip {
            late.restore_superseded(t, e, at, 5600);
        }
        late.add_tree_key_at(&tk, 5600).unwrap();
        late.add_tree_key_at(&tk2, 5600).unwrap();
        late.add_tree_key_at(&tk1, 5600).unwrap();
        assert!(late.accepts_message(&e1, 0, 6000, true));
        assert!(!late.accepts_message(&e1, 0, 6001, true));
        let mut rotated = Keyring::with_grace(1000);
        rotated.restore_superseded(id, 0, 5000, 5600);
        rotated.add_tree_key_at(&tk, 5600).unwrap();
        assert!(live(&rotated, 9999), "epoch 0 is current: no grace runs");
        rotated.add_tree_key_at(&tk1, 5700).unwrap();
        assert!(!live(&rotated, 6001), "superseded later: the saved time");
        // History is judged by the cutoff alone, as before.
        assert!(after.accepts_message(&old, 0, 99_999, false));
        // The clock went back before the saved time: the grace is taken as over.
        let mut back = Keyring::with_grace(1000);
        back.add_tree_key_at(&tk, 4000).unwrap();
        back.add_tree_key_at(&tk1, 4000).unwrap();
        back.restore_superseded(id, 0, 5000, 4000);
        assert!(!live(&back, 4001));
        assert!(back.accepts_message(&old, 0, 4001, false));
        assert_eq!(back.superseded_epochs(), [(id, 0, 0)]);
        // Times of epochs not held are kept (a later run may hold them), the newest few
        // per tree.
        let mut many = Keyring::new();
        for e in 0..20 {
            many.restore_superseded(id, e, 100 + e, 1000);
        }
        let kept = many.superseded_epochs();
        assert_eq!(kept.len(), SUPERSEDED_KEPT_PER_TREE);
        assert_eq!(kept[0], (id, 12, 112));
        assert_eq!(kept[7], (id, 19, 119));
    }

    /// Review of e8ad48c (minor): the cap on saved supersede times kept the newest few
    /// epochs per tree whether held or not, so a run holding more superseded epochs than
    /// the cap (the oldest grant, the newest, then the others newest first: each a late
    /// grant, superseded at the rotation) saved only the newest; the next run, adding them again, gave the others a
    /// new grace from its start. Every epoch held superseded is saved and restored now;
    /// only times of epochs not held are capped.
    #[test]
    fn every_epoch_held_superseded_keeps_its_supersede_time() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(41);
        let mut keys = vec![TreeKey::generate_with("home", &mut rng).unwrap()];
        let n = SUPERSEDED_KEPT_PER_TREE + 4;
        for _ in 0..n {
            let next = keys.last().unwrap().rotate(u64::MAX, &mut rng).unwrap();
            keys.push(next);
        }
        let id = keys[0].tree_id();
        let oldest = keys[0].cert().keys().key_id();
        let run = |at: u64, saved: &[(TreeId, u64, u64)]| {
            let mut kr = Keyring::with_grace(1000);
            // The oldest, the newest, then the others newest first (late grants).
            kr.add_tree_key_at(&keys[0], at).unwrap();
            for k in keys[1..].iter().rev() {
                kr.add_tree_key_at(k, at).unwrap();
            }
            for (t, e, s) in saved {
                kr.restore_superseded(*t, *e, *s, at);
            }
            kr
        };
        // The first run sees the rotation at 5000: every older epoch superseded then.
        let first = run(5000, &[]);
        let saved = first.superseded_epochs();
        assert_eq!(saved.len(), n, "{saved:?}");
        assert!(saved.iter().all(|(t, _, at)| *t == id && *at == 5000));
        // The next run, at 5600, with the same grants (newest first): the oldest epoch's
        // grace is still the first one.
        let next = run(5600, &saved);
        assert!(next.accepts_message(&oldest, 0, 6000, true));
        assert!(!next.accepts_message(&oldest, 0, 6001, true), "a new grace");
        assert_eq!(next.superseded_epochs(), saved);
        // Restored before the grants, alike.
        let mut before = Keyring::with_grace(1000);
        for (t, e, s) in &saved {
            before.restore_superseded(*t, *e, *s, 5600);
        }
        assert_eq!(before.superseded_epochs().len(), SUPERSEDED_KEPT_PER_TREE);
    }

    #[test]
    fn admin_is_pinned() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let tk = TreeKey::generate_with("home", &mut rng).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        // Same tree id, different admin: forged by someone else.
        let other = TreeKey::generate_with("home", &mut rng).unwrap();
        let forged = crate::tree::tests_support::with_tree_id(&other, tk.tree_id());
        assert!(matches!(
            kr.add_tree_key_at(&forged, 0),
            Err(KeyError::AdminMismatch { .. })
        ));
    }

    // ---- Trust: each attack of issue 9 refused (these fail if the defence is removed) ----

    use crate::identity::Identity;
    use crate::seal::{MessageId, Opener, Outgoing, SealOptions, Sealer};
    use crate::tree::tests_support::{copy_rn, forge_narrowed, passphrase_at, with_forced_key_id};
    use crate::tree::Provenance;

    fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(seed)
    }

    fn seal_on(kr: &Keyring, topic: &str, ts_ms: u64, seed: u64) -> crate::Envelope {
        let key = kr.topic_key(&t(topic)).unwrap();
        let msg = Outgoing {
            payload: b"x",
            content_type: "text/plain",
            msg_id: MessageId([seed as u8; 16]),
            ts_ms,
        };
        Sealer::new()
            .seal(&key, &msg, &SealOptions::default(), None, &mut rng(seed))
            .unwrap()
    }

    #[test]
    fn forged_exact_topic_grant_under_held_subtree_is_refused() {
        let mut r = rng(31);
        let tk = TreeKey::generate_with("team", &mut r).unwrap();
        let mallory = Identity::generate_with(&mut r);
        let team = tk.grant(&Scope::Subtree(t("team")));
        let mut victim = Keyring::new();
        victim.add_grant_at(team.clone(), 0).unwrap();
        // Mallory (holding team/#) hands over an exact-topic grant for team/secret with a
        // key she chose.
        let forged = forge_narrowed(
            &team,
            Scope::Subtree(t("team")),
            Scope::Topic(t("team/secret")),
            [0x66; 32],
            &mallory,
        );
        let err = victim.add_grant_at(forged, 1).unwrap_err();
        assert_eq!(
            err,
            KeyError::Contradicts {
                tree: tk.tree_id().to_string(),
                scope: "team/secret".into(),
                held: "team/#".into(),
            }
        );
        // The victim still seals team/secret under the tree's real key.
        let key = victim.topic_key(&t("team/secret")).unwrap();
        assert_eq!(
            key.message_key,
            tk.grant_all().message_key(&t("team/secret")).unwrap()
        );
        // An honest narrowing by Mallory is accepted and shown as derived, not delegated.
        let honest = team.narrow(&t("team/secret"), true, &mallory).unwrap();
        let added = victim.add_grant_report_at(honest, 2).unwrap();
        assert_eq!(
            added.provenance,
            Some(Provenance::Derived {
                from: Scope::Subtree(t("team"))
            })
        );
    }

    #[test]
    fn forged_grant_held_first_is_dropped_when_the_verified_broader_grant_arrives() {
        let mut r = rng(32);
        let tk = TreeKey::generate_with("team", &mut r).unwrap();
        let mallory = Identity::generate_with(&mut r);
        let team = tk.grant(&Scope::Subtree(t("team")));
        let forged = forge_narrowed(
            &team,
            Scope::Subtree(t("team")),
            Scope::Topic(t("team/secret")),
            [0x66; 32],
            &mallory,
        );
        let mut victim = Keyring::new();
        let added = victim.add_grant_report_at(forged, 0).unwrap();
        assert_eq!(
            added.provenance,
            Some(Provenance::Delegated {
                by: mallory.sender_id()
            })
        );
        // Delegated: never seals unless opted in.
        assert!(matches!(
            victim.topic_key(&t("team/secret")),
            Err(KeyError::NotSealable { .. })
        ));
        let added = victim.add_grant_report_at(team, 1).unwrap();
        assert_eq!(added.provenance, Some(Provenance::AdminSigned));
        assert_eq!(added.dropped.len(), 1);
        assert_eq!(added.dropped[0].scope, Scope::Topic(t("team/secret")));
        assert_eq!(added.dropped[0].contradicted_by, Scope::Subtree(t("team")));
        assert_eq!(victim.grants().count(), 1);
        let key = victim.topic_key(&t("team/secret")).unwrap();
        assert_eq!(
            key.message_key,
            tk.grant_all().message_key(&t("team/secret")).unwrap()
        );
    }

    /// `Derived` (verified, seals) comes only from a verified held grant: a grant Mallory
    /// narrows from her own forged, delegated grant is as unverified as the forgery, in
    /// either order of arrival — a delegated broader grant confirms nothing under it.
    #[test]
    fn a_narrowing_of_a_delegated_grant_stays_delegated_in_either_order() {
        let mut r = rng(34);
        let tk = TreeKey::generate_with("team", &mut r).unwrap();
        let mallory = Identity::generate_with(&mut r);
        let team = tk.grant(&Scope::Subtree(t("team")));
        // Mallory's team/a/# with a key she chose, and team/a/b narrowed from it (so its key
        // derives from the forgery's).
        let forged = forge_narrowed(
            &team,
            Scope::Subtree(t("team")),
            Scope::Subtree(t("team/a")),
            [0x66; 32],
            &mallory,
        );
        let narrowed = forged.narrow(&t("team/a/b"), true, &mallory).unwrap();
        let delegated = Some(Provenance::Delegated {
            by: mallory.sender_id(),
        });
        for order in [[&forged, &narrowed], [&narrowed, &forged]] {
            let mut victim = Keyring::new();
            for (at, g) in order.into_iter().enumerate() {
                let added = victim.add_grant_report_at(g.clone(), at as u64).unwrap();
                assert_eq!(added.provenance, delegated, "{}", g.scope());
                assert!(added.dropped.is_empty());
            }
            assert!(
                victim.held_grants().all(|(_, p)| !p.is_verified()),
                "every grant held stays delegated"
            );
            for topic in ["team/a/b", "team/a/c"] {
                assert!(
                    matches!(
                        victim.topic_key(&t(topic)),
                        Err(KeyError::NotSealable { .. })
                    ),
                    "{topic} seals under Mallory's key without an opt-in"
                );
            }
        }
    }

    /// PROTOCOL §5.8 "Provenance" and "Duplicates", §4.10 step 5: a narrowed grant is
    /// derived from the last held verified grant strictly containing it; a duplicate of a
    /// higher rank replaces the held grant, one of a lower or equal rank changes nothing; an
    /// opened message reports the most trusted, then the most specific, covering grant.
    #[test]
    fn derived_scope_duplicates_and_the_provenance_an_opened_message_reports() {
        let mut r = rng(35);
        let tk = TreeKey::generate_with("team", &mut r).unwrap();
        let (x, y) = (
            Identity::generate_with(&mut r),
            Identity::generate_with(&mut r),
        );
        let tid = tk.tree_id();
        let team = tk.grant(&Scope::Subtree(t("team")));
        let ab = Scope::Topic(t("team/a/b"));
        let ab_by_x = team.narrow(&t("team/a/b"), true, &x).unwrap();
        let ab_by_y = team.narrow(&t("team/a/b"), true, &y).unwrap();
        let mut kr = Keyring::new();
        // Two delegations of one scope: the first stays.
        kr.add_grant_at(ab_by_x, 0).unwrap();
        let added = kr.add_grant_report_at(ab_by_y.clone(), 0).unwrap();
        let by_x = Provenance::Delegated { by: x.sender_id() };
        assert_eq!(added.provenance, Some(by_x.clone()));
        assert_eq!(kr.held_grants().count(), 1);
        // team/# (verified) upgrades it to derived from team/#; # later changes nothing.
        kr.add_grant_at(team.clone(), 0).unwrap();
        let from_team = Provenance::Derived {
            from: Scope::Subtree(t("team")),
        };
        assert_eq!(kr.provenance(tid, &ab), Some(&from_team));
        kr.add_grant_at(tk.grant_all(), 0).unwrap();
        assert_eq!(kr.provenance(tid, &ab), Some(&from_team));
        // A narrowed grant arriving now is derived from the last held verified grant that
        // strictly contains it (held in the order team/a/b, team/#, #): '#'.
        let a_by_y = team.narrow(&t("team/a"), false, &y).unwrap();
        let added = kr.add_grant_report_at(a_by_y, 0).unwrap();
        assert_eq!(
            added.provenance,
            Some(Provenance::Derived { from: Scope::Tree })
        );
        // Opening reports rank before specificity: team/a/# (derived) is the most specific
        // grant covering team/a/c, but the admin-signed ones rank higher.
        let env = seal_on(&kr, "team/a/c", 5, 3);
        let o = Opener::new().open(&kr, &env, 5).unwrap();
        assert_eq!(o.provenance, Provenance::AdminSigned);
        // An admin-signed duplicate replaces the derived team/a/b; a delegated one then
        // changes nothing.
        let added = kr.add_grant_report_at(tk.grant(&ab), 0).unwrap();
        assert_eq!(added.provenance, Some(Provenance::AdminSigned));
        let added = kr.add_grant_report_at(ab_by_y, 0).unwrap();
        assert_eq!(added.provenance, Some(Provenance::AdminSigned));
        assert_eq!(kr.held_grants().count(), 4);
    }

    #[test]
    fn delegated_grants_open_but_seal_only_after_opt_in() {
        let mut r = rng(33);
        let tk = TreeKey::generate_with("team", &mut r).unwrap();
        let bob = Identity::generate_with(&mut r);
        let team = tk.grant(&Scope::Subtree(t("team")));
        let narrowed = team.narrow(&t("team/a"), false, &bob).unwrap();
        let mut full = Keyring::new();
        full.add_tree_key_at(&tk, 0).unwrap();
        let env = seal_on(&full, "team/a/x", 10, 1);
        let mut kr = Keyring::new();
        kr.add_grant_at(narrowed, 0).unwrap();
        let o = Opener::new().open(&kr, &env, 10).unwrap();
        assert_eq!(
            o.provenance,
            Provenance::Delegated {
                by: bob.sender_id()
            }
        );
        assert!(matches!(
            kr.grant_for(&t("team/a/x")),
            Err(KeyError::NotSealable { .. })
        ));
        assert!(matches!(
            kr.allow_sealing(tk.tree_id(), &Scope::Subtree(t("nope"))),
            Err(KeyError::NoSuchGrant { .. })
        ));
        kr.allow_sealing(tk.tree_id(), &Scope::Subtree(t("team/a")))
            .unwrap();
        assert!(kr.topic_key(&t("team/a/x")).is_ok());
        // The admin-signed path opens as admin-signed.
        assert_eq!(
            Opener::new().open(&full, &env, 10).unwrap().provenance,
            Provenance::AdminSigned
        );
    }

    #[test]
    fn a_second_tree_copying_r_and_n_cannot_take_the_key_id() {
        let mut r = rng(34);
        let a = TreeKey::generate_with("home", &mut r).unwrap();
        let attacker = TreeKey::generate_with("home", &mut r).unwrap();
        let copy = copy_rn(&a, &attacker, attacker.tree_id());
        assert_ne!(
            copy.epoch_keys().key_id(),
            a.cert().keys().key_id(),
            "the key id binds the tree id, not R alone"
        );
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&a, 0).unwrap();
        let env = seal_on(&kr, "door", 5, 2);
        kr.add_grant_at(copy, 1).unwrap();
        let o = Opener::new().open(&kr, &env, 5).unwrap();
        assert_eq!(o.tree_id, a.tree_id(), "A's messages still resolve to A");
        // Same tree id, other admin: refused by the pin.
        let same_id = copy_rn(&a, &attacker, a.tree_id());
        assert!(matches!(
            kr.add_grant_at(same_id, 2),
            Err(KeyError::AdminMismatch { .. })
        ));
        // And a certificate of another tree claiming a held key id outright is refused,
        // naming both trees.
        let claim = with_forced_key_id(&attacker.grant_all(), a.cert().keys().key_id());
        match kr.add_grant_at(claim, 3).unwrap_err() {
            KeyError::KeyIdConflict {
                held_tree,
                new_tree,
                ..
            } => {
                assert!(held_tree.contains(&a.tree_id().to_string()));
                assert!(new_tree.contains(&attacker.tree_id().to_string()));
            }
            e => panic!("{e}"),
        }
        assert_eq!(
            Opener::new().open(&kr, &env, 5).unwrap().tree_id,
            a.tree_id()
        );
    }

    #[test]
    fn two_trees_covering_a_topic_are_ambiguous_and_the_publisher_names_one() {
        let mut r = rng(35);
        let a = TreeKey::generate_with("a", &mut r).unwrap();
        let b = TreeKey::generate_with("b", &mut r).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&a, 0).unwrap();
        // A more specific grant of another tree does not silently win.
        kr.add_grant_at(b.grant(&Scope::Topic(t("team/secret"))), 0)
            .unwrap();
        match kr.grant_for(&t("team/secret")).unwrap_err() {
            KeyError::AmbiguousTree { trees, .. } => {
                assert!(trees.contains(&a.tree_id().to_string()));
                assert!(trees.contains(&b.tree_id().to_string()));
            }
            e => panic!("{e}"),
        }
        let k = kr.topic_key_in(a.tree_id(), &t("team/secret")).unwrap();
        assert_eq!(k.epoch_keys().tree_id(), a.tree_id());
        let k = kr.topic_key_in(b.tree_id(), &t("team/secret")).unwrap();
        assert_eq!(k.epoch_keys().tree_id(), b.tree_id());
        assert_eq!(
            kr.grant_for(&t("other")).unwrap().epoch_keys().tree_id(),
            a.tree_id()
        );
    }

    #[test]
    fn a_subscription_compiles_for_its_own_tree_only() {
        let mut r = rng(37);
        let a = TreeKey::generate_with("a", &mut r).unwrap();
        let b = TreeKey::generate_with("b", &mut r).unwrap();
        let mut kr = Keyring::new();
        kr.add_grant_at(a.grant(&Scope::Subtree(t("alerts"))), 0)
            .unwrap();
        let f = TopicFilter::new("alerts/#").unwrap();
        assert_eq!(kr.subscription_trees(&f, Some(0)), vec![a.tree_id()]);
        // Another tree's grant arriving later overlaps the filter: ambiguous, and it never
        // widens the patterns compiled for tree A.
        kr.add_grant_at(b.grant_all(), 0).unwrap();
        let mut both = vec![a.tree_id(), b.tree_id()];
        both.sort();
        assert_eq!(kr.subscription_trees(&f, Some(0)), both);
        assert_eq!(kr.subscription_trees(&f, None), both);
        assert_eq!(
            kr.compile(&f, 0).len(),
            2,
            "the unbound compile covers both"
        );
        let path = a.cert().keys().token_path(&t("alerts/fire"));
        let in_a = kr.compile_in(a.tree_id(), &f, 0);
        assert_eq!(in_a.len(), 1);
        assert!(in_a[0].matches(&path));
        let b_path = b.cert().keys().token_path(&t("alerts/fire"));
        assert!(!in_a[0].matches(&b_path), "tree B's messages are not A's");
        assert_eq!(kr.compile_history_in(a.tree_id(), &f), in_a);
        // A filter only B covers binds to B alone.
        let other = TopicFilter::new("news/#").unwrap();
        assert_eq!(kr.subscription_trees(&other, Some(0)), vec![b.tree_id()]);
        assert!(kr.compile_in(a.tree_id(), &other, 0).is_empty());
    }

    #[test]
    fn an_epoch_signed_by_anyone_but_the_pinned_admin_is_refused_even_after_restart() {
        let mut r = rng(36);
        let tk = TreeKey::generate_with("home", &mut r).unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let pins = kr.export_pins();
        let other = TreeKey::generate_with("home", &mut r).unwrap();
        let forged = crate::tree::tests_support::with_tree_id(&other, tk.tree_id())
            .rotate(0, &mut r)
            .unwrap();
        assert!(matches!(
            kr.add_tree_key_at(&forged, 1),
            Err(KeyError::AdminMismatch { .. })
        ));
        // A restarted client that restored only its pins refuses it too.
        let mut fresh = Keyring::new();
        assert_eq!(fresh.import_pins(&pins).unwrap(), 1);
        assert!(matches!(
            fresh.add_tree_key_at(&forged, 1),
            Err(KeyError::AdminMismatch { .. })
        ));
        assert_eq!(fresh.pin(tk.tree_id()).unwrap().admin, tk.admin());
        fresh
            .add_tree_key_at(&tk.rotate(0, &mut r).unwrap(), 2)
            .unwrap();
        // Pins that contradict held ones are refused; bad bytes are a typed error.
        let mut kr2 = Keyring::new();
        kr2.add_tree_key_at(
            &crate::tree::tests_support::with_tree_id(&other, tk.tree_id()),
            0,
        )
        .unwrap();
        assert!(matches!(
            kr2.import_pins(&pins),
            Err(KeyError::AdminMismatch { .. })
        ));
        assert!(kr2.import_pins(&pins[..pins.len() - 1]).is_err());
        assert!(kr2.import_pins(&[9]).is_err());
        // One file naming one tree twice with two admins is refused, changing nothing; the
        // same pin twice is not a contradiction.
        let mut twice = vec![PINS_FORMAT];
        twice.extend_from_slice(&2u32.to_be_bytes());
        for admin in [tk.admin(), other.admin()] {
            twice.extend_from_slice(&tk.tree_id().0);
            twice.extend_from_slice(&admin.to_bytes());
            twice.push(0);
        }
        let mut kr3 = Keyring::new();
        assert!(matches!(
            kr3.import_pins(&twice),
            Err(KeyError::AdminMismatch { .. })
        ));
        assert!(kr3.pin(tk.tree_id()).is_none(), "nothing imported");
        let same: Vec<u8> = [&twice[..5], &twice[5..54], &twice[5..54]].concat();
        assert_eq!(kr3.import_pins(&same).unwrap(), 1);
    }

    #[test]
    fn passphrase_trees_accept_no_later_epoch() {
        let fast = crate::tree::PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let mut r = rng(37);
        let pt = TreeKey::from_passphrase_in_realm_any_params("family", "", b"pw", fast).unwrap();
        assert!(pt.cert().is_passphrase());
        assert!(matches!(
            pt.rotate(0, &mut r),
            Err(KeyError::PassphraseEpoch { .. })
        ));
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&pt, 0).unwrap();
        // A member (who knows the admin key) signs epoch 1 with the flag: refused on parse.
        let flagged = passphrase_at(&pt, 1).grant_all();
        assert!(matches!(
            Grant::from_key_string(&flagged.to_key_string()),
            Err(KeyError::PassphraseEpoch { .. })
        ));
        assert!(matches!(
            kr.add_grant_at(flagged, 1),
            Err(KeyError::PassphraseEpoch { .. })
        ));
        // ... or without it: refused by the pinned flag.
        let unflagged = crate::tree::tests_support::unflag(&passphrase_at(&pt, 1));
        assert!(matches!(
            kr.add_tree_key_at(&unflagged, 1),
            Err(KeyError::PinMismatch { .. })
        ));
        // A realm changes the tree and its keys.
        let realm =
            TreeKey::from_passphrase_in_realm_any_params("family", "acme", b"pw", fast).unwrap();
        assert_ne!(realm.tree_id(), pt.tree_id());
        assert_ne!(realm.admin(), pt.admin());
    }

    /// Every member of a passphrase tree derives its admin key (§5.9), so an end signed into
    /// the certificate would let any one member cut every other member off: `min` over the
    /// certificates of an epoch (`add_grant_report_at`) keeps the earliest end seen.
    #[test]
    fn a_passphrase_member_cannot_end_the_tree() {
        let fast = crate::tree::PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let pt = TreeKey::from_passphrase_in_realm_any_params("family", "", b"pw", fast).unwrap();
        let key_id = pt.cert().keys().key_id();
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&pt, 0).unwrap();
        assert!(kr.accepts_message(&key_id, 10, 10, true));
        // The API does not sign such a certificate ...
        assert!(pt.clone().with_not_after(Some(1)).is_err());
        // ... and one Mallory signs herself with the admin key she derived is refused as a
        // key string (how a grant or an invite carries it) and by the keyring.
        let ended = crate::tree::tests_support::ending_at(&pt, 1);
        let forged = ended.grant_all();
        assert!(matches!(
            Grant::from_key_string(&forged.to_key_string()),
            Err(KeyError::InvalidString { .. })
        ));
        assert!(TreeKey::from_key_string(&ended.to_key_string()).is_err());
        assert!(matches!(
            kr.add_grant_at(forged, 0),
            Err(KeyError::InvalidString { .. })
        ));
        assert!(kr.accepts_message(&key_id, 10, 10, true));
        // An ordinary tree may still end.
        let mut r = rng(40);
        let tk = TreeKey::generate_with("home", &mut r).unwrap();
        assert_eq!(
            tk.with_not_after(Some(1)).unwrap().cert().not_after_ms(),
            Some(1)
        );
    }

    /// PROTOCOL §5.8 "Key ids": certificates of one (tree, epoch) must agree on R and N
    /// (`EpochConflict`); otherwise they are all accepted, and the keyring keeps the smallest
    /// cutoff and the earliest end among them. Equality is the boundary of every date rule:
    /// `ts_ms = not_after_ms` is accepted, `ts_ms = cutoff` refused, `now = superseded_at +
    /// grace` accepted live.
    #[test]
    fn certificates_of_one_epoch_merge_to_the_most_restrictive() {
        let tid = TreeId([9; 16]);
        let key = |epoch, root| TreeKey::from_parts(tid, epoch, "home", [root; 32], [2; 32]);
        let e0 = key(0, 1).unwrap();
        let id0 = e0.cert().keys().key_id();
        let mut kr = Keyring::with_grace(1_000);
        kr.add_tree_key_at(&e0, 0).unwrap();
        // Another root for the held epoch: another R and N (and key id).
        assert!(matches!(
            kr.add_tree_key_at(&key(0, 3).unwrap(), 0),
            Err(KeyError::EpochConflict { .. })
        ));
        // The same R and N with other ends: accepted; the earliest end is kept.
        for end in [Some(5_000), Some(9_000), None] {
            let k = e0.clone().with_not_after(end).unwrap();
            kr.add_tree_key_at(&k, 0).unwrap();
        }
        assert!(kr.accepts_message(&id0, 5_000, 0, true));
        assert!(!kr.accepts_message(&id0, 5_001, 0, true));
        // Epoch 1 with cutoffs 800, then 600, then 900: the smallest (600) is kept.
        for cut in [800, 600, 900] {
            kr.add_tree_key_at(&key(1, 4).unwrap().with_prev_cutoff(cut), 100)
                .unwrap();
        }
        assert!(kr.accepts_message(&id0, 599, 100, true));
        assert!(!kr.accepts_message(&id0, 600, 100, true));
        // Superseded at 100, grace 1000: live until now = 1100 included.
        assert!(kr.accepts_message(&id0, 599, 1_100, true));
        assert!(!kr.accepts_message(&id0, 599, 1_101, true));
        assert!(kr.accepts_message(&id0, 599, 1_101, false));
    }

    #[test]
    fn rotation_cutoff_bounds_the_previous_epoch() {
        let mut r = rng(38);
        let tk = TreeKey::generate_with("home", &mut r).unwrap();
        let mut kr = Keyring::with_grace(1_000);
        kr.add_tree_key_at(&tk, 0).unwrap();
        let before = seal_on(&kr, "a", 900, 3); // dated before the cutoff
        let after = seal_on(&kr, "a", 1_100, 4); // a removed member, dated after it
        let tk1 = tk.rotate(1_000, &mut r).unwrap();
        kr.add_tree_key_at(&tk1, 2_000).unwrap();
        let mut o = Opener::new();
        // Live within grace: only messages dated before the cutoff.
        assert!(o.open_with(&kr, &before, 2_500, true).is_ok());
        assert!(o.open_with(&kr, &after, 2_500, true).is_err());
        // Live after grace: nothing of epoch 0.
        assert!(o.open_with(&kr, &before, 3_001, true).is_err());
        // From history, any time: dated before the cutoff only.
        assert!(o.open_with(&kr, &before, 99_999, false).is_ok());
        assert!(o.open_with(&kr, &after, 99_999, false).is_err());
        assert!(!kr.accepts_message(&tk.cert().keys().key_id(), 1_000, 2_100, true));
        assert!(kr.accepts_message(&tk.cert().keys().key_id(), 999, 2_100, true));
    }

    #[test]
    fn messages_dated_after_not_after_are_refused() {
        let mut r = rng(39);
        let tk = TreeKey::generate_with("home", &mut r)
            .unwrap()
            .with_not_after(Some(5_000))
            .unwrap();
        assert_eq!(tk.cert().not_after_ms(), Some(5_000));
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk, 0).unwrap();
        let ok = seal_on(&kr, "a", 5_000, 5);
        let late = seal_on(&kr, "a", 5_001, 6);
        let mut o = Opener::new();
        assert!(o.open_with(&kr, &ok, 6_000, false).is_ok());
        assert!(o.open_with(&kr, &late, 6_000, false).is_err());
        assert!(o.open_with(&kr, &late, 6_000, true).is_err());
    }

    fn test_dict(i: u32) -> Dictionary {
        Dictionary::new(
            format!("{{\"room\":\"r{i}\",\"celsius\":21.5}}")
                .repeat(3)
                .into_bytes(),
        )
        .unwrap()
    }

    /// `grant` and `dictionaries` sealed by `inviter` to `to` (no expiry), opened by `to` at
    /// `now_ms`.
    fn opened_invite(
        grant: &Grant,
        dictionaries: &[Dictionary],
        inviter: &Identity,
        to: &Identity,
        now_ms: u64,
        r: &mut rand_chacha::ChaCha20Rng,
    ) -> Invite {
        let sealed = Invite::seal_with_dictionaries(
            grant,
            dictionaries,
            inviter,
            &to.public_id(),
            u64::MAX,
            r,
        );
        Invite::open(&sealed.unwrap(), to, now_ms).unwrap()
    }

    /// Review finding (A): an invite whose grant the keyring ignores (its epoch is older
    /// than every epoch held) added its dictionaries anyway, and nobody could tell.
    #[test]
    fn an_ignored_invite_adds_no_dictionary_and_says_why() {
        let mut r = rng(40);
        let tk0 = TreeKey::generate_with("home", &mut r).unwrap();
        let tk1 = tk0.rotate(1_000, &mut r).unwrap();
        let tk2 = tk1.rotate(2_000, &mut r).unwrap();
        let (admin, bob) = (
            Identity::generate_with(&mut r),
            Identity::generate_with(&mut r),
        );
        let mut kr = Keyring::new();
        kr.add_tree_key_at(&tk0, 0).unwrap();
        kr.add_tree_key_at(&tk1, 1_000).unwrap();
        kr.add_tree_key_at(&tk2, 2_000).unwrap(); // epoch 0 dropped: 1 and 2 held
        let d = test_dict(1);
        let just_d = std::slice::from_ref(&d);
        let old = opened_invite(&tk0.grant_all(), just_d, &admin, &bob, 3_000, &mut r);
        let out = kr.accept_invite_at(&old, 3_000).unwrap();
        assert!(!out.is_accepted());
        assert_eq!(out.provenance, None);
        assert_eq!(
            out.ignored,
            Some(Ignored::EpochTooOld {
                epoch: 0,
                oldest_held: 1
            })
        );
        assert_eq!((out.tree_id, out.epoch), (tk0.tree_id(), 0));
        assert!(out.dictionaries_added.is_empty());
        assert!(
            kr.dictionaries().is_empty(),
            "an ignored grant adds no dictionary"
        );
        // Control: the same dictionary with a current grant is added, and reported.
        let cur = opened_invite(&tk2.grant_all(), just_d, &admin, &bob, 3_000, &mut r);
        let out = kr.accept_invite_at(&cur, 3_000).unwrap();
        assert!(out.is_accepted() && out.ignored.is_none());
        assert_eq!(out.provenance, Some(Provenance::AdminSigned));
        assert_eq!(out.dictionaries_added, vec![d.id()]);
        assert!(kr.dictionary(&d.id()).is_some());
    }

    /// Review finding (A): a keyring held every dictionary it was given, so a member sending
    /// invites with new dictionaries grew a victim's memory without bound.
    #[test]
    fn the_dictionaries_a_keyring_holds_are_bounded() {
        let mut r = rng(41);
        let tk = TreeKey::generate_with("home", &mut r).unwrap();
        let (mallory, bob) = (
            Identity::generate_with(&mut r),
            Identity::generate_with(&mut r),
        );
        let mut kr = Keyring::new();
        for i in 0..MAX_DICTIONARIES as u32 {
            assert!(kr.add_dictionary(test_dict(i)));
        }
        let one_more = test_dict(MAX_DICTIONARIES as u32);
        assert!(!kr.add_dictionary(one_more.clone()));
        assert_eq!(
            kr.try_add_dictionary(one_more.clone()),
            Err(KeyError::TooManyDictionaries {
                held: MAX_DICTIONARIES,
                adding: 1,
                max: MAX_DICTIONARIES
            })
        );
        // One already held is not "more".
        assert_eq!(kr.try_add_dictionary(test_dict(0)), Ok(false));
        // An invite carrying a new one is refused whole: neither its grant nor it is added.
        let dicts = [one_more.clone(), test_dict(1)];
        let inv = opened_invite(&tk.grant_all(), &dicts, &mallory, &bob, 0, &mut r);
        assert!(matches!(
            kr.accept_invite_at(&inv, 0),
            Err(KeyError::TooManyDictionaries { adding: 1, .. })
        ));
        assert!(kr.is_empty());
        assert_eq!(kr.dictionaries().len(), MAX_DICTIONARIES);
        // Room made, it is accepted.
        assert!(kr.remove_dictionary(&test_dict(7).id()));
        let out = kr.accept_invite_at(&inv, 0).unwrap();
        assert_eq!(out.dictionaries_added, vec![one_more.id()]);
        assert_eq!(kr.dictionaries().len(), MAX_DICTIONARIES);
    }

    /// Review finding (C, mitigation): a member removed by a rotation can still enrol a
    /// newcomer into the dead epoch by sealing her stored admin-signed grant to them; the
    /// newcomer's empty keyring accepts it as admin-signed and cannot know a newer epoch
    /// exists. Not prevented: the outcome says the inviter is a member, not the admin.
    #[test]
    fn a_removed_member_can_enrol_a_newcomer_into_the_old_epoch_and_the_outcome_says_a_member_did()
    {
        let mut r = rng(42);
        let tk0 = TreeKey::generate_with("home", &mut r).unwrap();
        let admin = tk0.admin_identity();
        assert_eq!(admin.sender_id(), tk0.admin());
        let (mallory, newcomer) = (
            Identity::generate_with(&mut r),
            Identity::generate_with(&mut r),
        );
        // Mallory gets epoch 0 from the admin.
        let to_mallory = Invite::seal(
            &tk0.grant_all(),
            &admin,
            &mallory.public_id(),
            u64::MAX,
            &mut r,
        )
        .unwrap();
        let g0 = Invite::open(&to_mallory, &mallory, 0).unwrap();
        assert!(g0.inviter_is_admin());
        let mut mallorys = Keyring::new();
        let out = mallorys.accept_invite_at(&g0, 0).unwrap();
        assert!(out.inviter_is_admin && out.inviter == tk0.admin());
        // The admin rotates her out.
        let tk1 = tk0.rotate(1_000, &mut r).unwrap();
        // Mallory seals her epoch-0 grant to a newcomer.
        let inv =
            Invite::seal(&g0.grant, &mallory, &newcomer.public_id(), u64::MAX, &mut r).unwrap();
        let inv = Invite::open(&inv, &newcomer, 2_000).unwrap();
        let mut kr = Keyring::new();
        let out = kr.accept_invite_at(&inv, 2_000).unwrap();
        // Accepted, admin-signed — the attack is not prevented — but a member enrolled them.
        assert!(out.is_accepted());
        assert_eq!(out.provenance, Some(Provenance::AdminSigned));
        assert_eq!(out.epoch, 0);
        assert_eq!(out.inviter, mallory.sender_id());
        assert!(!out.inviter_is_admin);
        assert!(!inv.inviter_is_admin());
        // The admin's own invite of the current epoch says "admin".
        let from_admin = Invite::seal(
            &tk1.grant_all(),
            &tk1.admin_identity(),
            &newcomer.public_id(),
            u64::MAX,
            &mut r,
        )
        .unwrap();
        let out = kr
            .accept_invite_at(&Invite::open(&from_admin, &newcomer, 3_000).unwrap(), 3_000)
            .unwrap();
        assert!(out.inviter_is_admin);
        assert_eq!((out.epoch, out.inviter), (1, tk1.admin()));
        assert_eq!(
            tk1.admin_identity().sender_id(),
            tk0.admin_identity().sender_id()
        );
    }
}
