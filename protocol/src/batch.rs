//! Batch signatures (`sig_scheme = 2`, PROTOCOL.md §4.14): a publisher signs once over the
//! Merkle root of the messages it sealed within a short window, and each message carries
//! its salted leaf's inclusion path, so it verifies alone.
//!
//! ```text
//! leaf  = BLAKE3(0x00 ‖ salt[32] ‖ sig_input)        sig_input: the §4.8 bytes
//! node  = BLAKE3(0x01 ‖ left[32] ‖ right[32])
//! MTH(D[0..1]) = leaf;  MTH(D[0..n]) = node(MTH(D[0..k]), MTH(D[k..n])),
//!                       k = the largest power of two < n   (RFC 9162 §2.1.1)
//! signed = "whispeer/v2/batch-sig\0" ‖ tree_id[16] ‖ u64be(epoch) ‖ u32be(count) ‖ root[32]
//! ```
//! The path lists the siblings from the leaf upwards; its length must equal the depth
//! implied by `(index, count)`, and `index < count ≤ 4096`. Sans-IO: salts come from the
//! caller's RNG, time from the caller.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signature, VerifyingKey};
use rand_core::CryptoRngCore;

use crate::error_keys::{BodyError, SealError};
use crate::identity::{Identity, SenderId};
use crate::seal::Prepared;
use crate::tree::TreeId;

/// The largest number of messages in one batch.
pub const MAX_BATCH: u32 = 4096;
/// The longest inclusion path (the depth of a tree of [`MAX_BATCH`] leaves).
pub const MAX_PATH: usize = 12;
/// Bytes of the per-message salt.
pub const SALT_LEN: usize = 32;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;
const BATCH_SIG_CONTEXT: &[u8] = b"whispeer/v2/batch-sig\0";

/// The leaf hash of one message: `BLAKE3(0x00 ‖ salt ‖ sig_input)`.
pub fn leaf_hash(salt: &[u8; SALT_LEN], sig_input: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF_PREFIX]);
    h.update(salt);
    h.update(sig_input);
    *h.finalize().as_bytes()
}

/// An inner node: `BLAKE3(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[NODE_PREFIX]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The bytes the batch signature covers.
pub fn batch_sig_input(tree_id: &TreeId, epoch: u64, count: u32, root: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BATCH_SIG_CONTEXT.len() + 16 + 8 + 4 + 32);
    m.extend_from_slice(BATCH_SIG_CONTEXT);
    m.extend_from_slice(&tree_id.0);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(&count.to_be_bytes());
    m.extend_from_slice(root);
    m
}

/// The largest power of two strictly below `n` (`n ≥ 2`).
fn split(n: u32) -> u32 {
    debug_assert!(n >= 2);
    1 << (31 - (n - 1).leading_zeros())
}

/// The side taken at each split from the top (`true` = right subtree) for leaf `index` of
/// `count`, and the depth. `None` when `count` or `index` is out of range.
fn directions(index: u32, count: u32) -> Option<([bool; MAX_PATH], usize)> {
    if count == 0 || count > MAX_BATCH || index >= count {
        return None;
    }
    let (mut i, mut n, mut d) = (index, count, 0usize);
    let mut dirs = [false; MAX_PATH];
    while n > 1 {
        let k = split(n);
        if i < k {
            n = k;
        } else {
            dirs[d] = true;
            i -= k;
            n -= k;
        }
        d += 1;
    }
    Some((dirs, d))
}

/// The path length a valid proof for leaf `index` of `count` has, or `None` when `count` is
/// not in `1..=4096` or `index ≥ count`.
pub fn path_len(index: u32, count: u32) -> Option<usize> {
    directions(index, count).map(|(_, d)| d)
}

/// The Merkle root over `leaves` and every leaf's inclusion path (siblings from the leaf up).
fn build(leaves: &[[u8; 32]], paths: &mut [Vec<[u8; 32]>]) -> [u8; 32] {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = split(leaves.len() as u32) as usize;
    let (lp, rp) = paths.split_at_mut(k);
    let l = build(&leaves[..k], lp);
    let r = build(&leaves[k..], rp);
    lp.iter_mut().for_each(|p| p.push(r));
    rp.iter_mut().for_each(|p| p.push(l));
    node_hash(&l, &r)
}

/// The Merkle root of `leaves` (1..=4096 of them).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    assert!(!leaves.is_empty() && leaves.len() <= MAX_BATCH as usize);
    let mut paths = vec![Vec::new(); leaves.len()];
    build(leaves, &mut paths)
}

/// One message's batch proof: what its body carries after `sig_scheme = 2`.
#[derive(Clone, PartialEq, Eq)]
pub struct BatchProof {
    pub(crate) sender: VerifyingKey,
    pub(crate) sig: Signature,
    pub(crate) count: u32,
    pub(crate) index: u32,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) path: Vec<[u8; 32]>,
}

impl fmt::Debug for BatchProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchProof")
            .field("sender", &SenderId(self.sender))
            .field("count", &self.count)
            .field("index", &self.index)
            .field("path_len", &self.path.len())
            .finish_non_exhaustive()
    }
}

impl BatchProof {
    /// The signer.
    pub fn sender(&self) -> SenderId {
        SenderId(self.sender)
    }
    /// Messages in the batch.
    pub fn count(&self) -> u32 {
        self.count
    }
    /// This message's leaf index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// The Ed25519 signature over the batch root.
    pub fn signature(&self) -> [u8; 64] {
        self.sig.to_bytes()
    }
    /// Salt of this message's leaf.
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }
    /// The inclusion path, siblings from the leaf upwards.
    pub fn path(&self) -> &[[u8; 32]] {
        &self.path
    }
    /// Encoded length: `32 + 64 + 4 + 4 + 32 + 1 + 32·path_len`.
    pub fn encoded_len(&self) -> usize {
        137 + 32 * self.path.len()
    }

    /// Writes `sender_pk ‖ sig ‖ u32be(count) ‖ u32be(index) ‖ salt ‖ u8(path_len) ‖ path`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.sender.as_bytes());
        out.extend_from_slice(&self.sig.to_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.push(self.path.len() as u8);
        for p in &self.path {
            out.extend_from_slice(p);
        }
    }

    /// Parses a proof from the front of `b`, returning it and the rest. Checks, in order:
    /// the sender key decodes; `count ∈ 1..=4096`; `index < count`; `path_len` equals the
    /// depth `(index, count)` implies.
    pub fn parse(b: &[u8]) -> Result<(Self, &[u8]), BodyError> {
        Self::parse_with(b, None)
    }

    /// [`BatchProof::parse`], decoding the sender key through `keys` (a key decodes the
    /// same wherever it is cached; decoding one costs a square root, about 5 µs).
    pub(crate) fn parse_with<'b>(
        b: &'b [u8],
        keys: Option<&mut SenderKeys>,
    ) -> Result<(Self, &'b [u8]), BodyError> {
        if b.len() < 137 {
            return Err(BodyError::Malformed);
        }
        let pk: &[u8; 32] = b[..32].try_into().expect("32");
        let sender = match keys {
            Some(k) => k.decode(pk),
            None => VerifyingKey::from_bytes(pk).ok(),
        }
        .ok_or(BodyError::Malformed)?;
        let sig = Signature::from_bytes(b[32..96].try_into().expect("64"));
        let count = u32::from_be_bytes(b[96..100].try_into().expect("4"));
        let index = u32::from_be_bytes(b[100..104].try_into().expect("4"));
        let salt: [u8; SALT_LEN] = b[104..136].try_into().expect("32");
        let len = b[136] as usize;
        if count == 0 || count > MAX_BATCH {
            return Err(BodyError::BatchCount(count));
        }
        if index >= count {
            return Err(BodyError::BatchIndex { index, count });
        }
        let expected = path_len(index, count).expect("in range");
        if len != expected {
            return Err(BodyError::BatchPathLength { len, expected });
        }
        let rest = &b[137..];
        if rest.len() < 32 * len {
            return Err(BodyError::Malformed);
        }
        let path = rest[..32 * len]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32"))
            .collect();
        Ok((
            BatchProof {
                sender,
                sig,
                count,
                index,
                salt,
                path,
            },
            &rest[32 * len..],
        ))
    }

    /// The root this proof implies for a message whose §4.8 bytes are `sig_input`.
    pub fn root(&self, sig_input: &[u8]) -> Result<[u8; 32], BodyError> {
        let (dirs, d) = directions(self.index, self.count).ok_or(
            if self.count == 0 || self.count > MAX_BATCH {
                BodyError::BatchCount(self.count)
            } else {
                BodyError::BatchIndex {
                    index: self.index,
                    count: self.count,
                }
            },
        )?;
        if self.path.len() != d {
            return Err(BodyError::BatchPathLength {
                len: self.path.len(),
                expected: d,
            });
        }
        let mut h = leaf_hash(&self.salt, sig_input);
        for (j, sib) in self.path.iter().enumerate() {
            h = if dirs[d - 1 - j] {
                node_hash(sib, &h)
            } else {
                node_hash(&h, sib)
            };
        }
        Ok(h)
    }

    /// Verifies the proof for a message of tree `tree_id`, epoch `epoch`, whose §4.8 bytes
    /// are `sig_input`: recompute the root, then (unless `cache` already holds exactly this
    /// sender, tree, epoch, count, root and signature) strict-verify the Ed25519 signature
    /// and remember the root.
    pub fn verify(
        &self,
        tree_id: &TreeId,
        epoch: u64,
        sig_input: &[u8],
        cache: Option<&mut VerifiedRoots>,
    ) -> Result<SenderId, BodyError> {
        match cache {
            Some(c) => self.verify_in(tree_id, epoch, sig_input, RootCache::Own(c)),
            None => self.verify_in(tree_id, epoch, sig_input, RootCache::None),
        }
    }

    /// [`BatchProof::verify`] with a cache shared between threads ([`SharedRoots`]).
    pub fn verify_shared(
        &self,
        tree_id: &TreeId,
        epoch: u64,
        sig_input: &[u8],
        cache: &SharedRoots,
    ) -> Result<SenderId, BodyError> {
        self.verify_in(tree_id, epoch, sig_input, RootCache::Shared(cache))
    }

    pub(crate) fn verify_in(
        &self,
        tree_id: &TreeId,
        epoch: u64,
        sig_input: &[u8],
        cache: RootCache<'_>,
    ) -> Result<SenderId, BodyError> {
        let root = self.root(sig_input)?;
        let key = RootKey {
            sender: self.sender.to_bytes(),
            tree: tree_id.0,
            epoch,
            count: self.count,
            root,
            sig: self.sig.to_bytes(),
        };
        let mut cache = cache;
        let hit = match &mut cache {
            RootCache::None => false,
            RootCache::Own(c) => c.hit(&key),
            // The lock is held for the lookup only, never across the verification.
            RootCache::Shared(c) => c.lock().hit(&key),
        };
        if hit {
            return Ok(SenderId(self.sender));
        }
        let m = batch_sig_input(tree_id, epoch, self.count, &root);
        self.sender
            .verify_strict(&m, &self.sig)
            .map_err(|_| BodyError::BadSignature)?;
        match cache {
            RootCache::None => {}
            RootCache::Own(c) => c.insert(key),
            RootCache::Shared(c) => c.lock().insert(key),
        }
        Ok(SenderId(self.sender))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RootKey {
    sender: [u8; 32],
    tree: [u8; 16],
    epoch: u64,
    count: u32,
    root: [u8; 32],
    sig: [u8; 64],
}

/// Batch roots whose signature verified, so a batch costs one Ed25519 verification per
/// receiver. Keyed by everything the signature covers plus the signer and the signature
/// itself — `(sender_pk, tree_id, epoch, count, root, sig)` — so a hit accepts exactly what
/// a cold verification would: a root never verifies for another tree, epoch, count or
/// sender, and a damaged signature never rides on a cached root. Bounded: the oldest entry
/// is evicted first (insertion order). Only verified roots are inserted, so nobody without
/// a signer's key can fill it.
pub struct VerifiedRoots {
    cap: usize,
    set: HashSet<RootKey>,
    pub(crate) order: VecDeque<RootKey>,
    hits: u64,
    raced: u64,
}

/// Where [`BatchProof::verify_in`] looks a root up.
pub(crate) enum RootCache<'a> {
    None,
    Own(&'a mut VerifiedRoots),
    Shared(&'a SharedRoots),
}

/// A [`VerifiedRoots`] shared by openers on several threads (a subscriber opening in
/// parallel): a batch still costs one verification, except when two threads meet the same
/// new root at once — both verify, and [`VerifiedRoots::raced`] counts the second.
#[derive(Clone, Debug, Default)]
pub struct SharedRoots(Arc<Mutex<VerifiedRoots>>);

impl SharedRoots {
    /// A shared cache of at most `cap` roots.
    pub fn new(cap: usize) -> Self {
        SharedRoots(Arc::new(Mutex::new(VerifiedRoots::new(cap))))
    }
    /// The cache (a poisoned lock is taken over: the set holds only verified roots).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, VerifiedRoots> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decoded sender keys, most recent first: a subscriber meets few senders, and decoding a
/// key (a point decompression) costs about as much as the rest of opening a 1 KiB message.
#[derive(Debug, Default)]
pub(crate) struct SenderKeys {
    keys: VecDeque<([u8; 32], VerifyingKey)>,
}

impl SenderKeys {
    const CAP: usize = 16;
    /// The key `pk` encodes (`None`: not a valid point).
    pub(crate) fn decode(&mut self, pk: &[u8; 32]) -> Option<VerifyingKey> {
        if let Some(i) = self.keys.iter().position(|(b, _)| b == pk) {
            let k = self.keys[i].1;
            if i > 0 {
                let e = self.keys.remove(i).expect("present");
                self.keys.push_front(e);
            }
            return Some(k);
        }
        let k = VerifyingKey::from_bytes(pk).ok()?;
        self.keys.push_front((*pk, k));
        self.keys.truncate(Self::CAP);
        Some(k)
    }
}

impl fmt::Debug for VerifiedRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedRoots")
            .field("cap", &self.cap)
            .field("len", &self.set.len())
            .field("hits", &self.hits)
            .finish()
    }
}

impl Default for VerifiedRoots {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl VerifiedRoots {
    /// The default capacity.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A cache of at most `cap` roots (`0` disables caching).
    pub fn new(cap: usize) -> Self {
        VerifiedRoots {
            cap,
            set: HashSet::new(),
            order: VecDeque::new(),
            hits: 0,
            raced: 0,
        }
    }
    /// Roots held.
    pub fn len(&self) -> usize {
        self.set.len()
    }
    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
    /// Verifications saved so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }
    /// Roots verified twice because two openers met them at once (shared cache only).
    pub fn raced(&self) -> u64 {
        self.raced
    }
    fn hit(&mut self, k: &RootKey) -> bool {
        let hit = self.set.contains(k);
        if hit {
            self.hits += 1;
        }
        hit
    }
    /// Forgets every root.
    pub fn clear(&mut self) {
        self.set.clear();
        self.order.clear();
    }
    pub(crate) fn insert(&mut self, k: RootKey) {
        if self.cap == 0 {
            return;
        }
        if !self.set.insert(k) {
            self.raced += 1;
            return;
        }
        self.order.push_back(k);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// When to close a batch: at most `max_messages` (1..=4096) or `max_wait_us` after its first
/// message, whichever comes first. The caller owns the clock ([`BatchSigner::due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Messages per batch, clamped to 1..=4096.
    pub max_messages: u32,
    /// Microseconds from the first message to signing.
    pub max_wait_us: u64,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_messages: 64,
            max_wait_us: 5_000,
        }
    }
}

/// Collects the messages of one batch (one tree and epoch), then signs their Merkle root
/// once and yields each message's [`BatchProof`] (in push order) to seal with
/// [`crate::Sealer::seal_prepared`].
pub struct BatchSigner {
    policy: BatchPolicy,
    tree_epoch: Option<(TreeId, u64)>,
    started_us: Option<u64>,
    leaves: Vec<[u8; 32]>,
    salts: Vec<[u8; SALT_LEN]>,
}

impl fmt::Debug for BatchSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSigner")
            .field("policy", &self.policy)
            .field("len", &self.leaves.len())
            .finish_non_exhaustive()
    }
}

impl BatchSigner {
    /// An empty batch.
    pub fn new(policy: BatchPolicy) -> Self {
        let policy = BatchPolicy {
            max_messages: policy.max_messages.clamp(1, MAX_BATCH),
            ..policy
        };
        BatchSigner {
            policy,
            tree_epoch: None,
            started_us: None,
            leaves: Vec::new(),
            salts: Vec::new(),
        }
    }
    /// Messages so far.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }
    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }
    /// Whether it holds `max_messages`.
    pub fn is_full(&self) -> bool {
        self.leaves.len() >= self.policy.max_messages as usize
    }
    /// The (tree, epoch) of this batch, once it has a message.
    pub fn tree_epoch(&self) -> Option<(TreeId, u64)> {
        self.tree_epoch
    }
    /// Whether to sign now: full, or `max_wait_us` passed since the first push.
    pub fn due(&self, now_us: u64) -> bool {
        self.is_full()
            || self
                .started_us
                .is_some_and(|s| now_us.saturating_sub(s) >= self.policy.max_wait_us)
    }

    /// Adds a message, drawing its 32-byte salt from `rng`; returns its leaf index. A message
    /// of another (tree, epoch) is refused ([`SealError::BatchTreeEpoch`]: sign this batch and
    /// start a new one), as is one beyond `max_messages` ([`SealError::BatchFull`]).
    pub fn push(
        &mut self,
        msg: &Prepared,
        now_us: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<u32, SealError> {
        let te = (msg.key.keys.tree_id(), msg.key.keys.epoch());
        match self.tree_epoch {
            Some(x) if x != te => return Err(SealError::BatchTreeEpoch),
            _ => {}
        }
        if self.is_full() {
            return Err(SealError::BatchFull(self.policy.max_messages));
        }
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        self.leaves.push(leaf_hash(&salt, &msg.sig_input));
        self.salts.push(salt);
        self.tree_epoch = Some(te);
        self.started_us.get_or_insert(now_us);
        Ok(self.leaves.len() as u32 - 1)
    }

    /// Computes the root once, signs it once, and returns every message's proof in push
    /// order. An empty batch is an error ([`SealError::BatchEmpty`]).
    pub fn sign(self, signer: &Identity) -> Result<Vec<BatchProof>, SealError> {
        let (tree_id, epoch) = self.tree_epoch.ok_or(SealError::BatchEmpty)?;
        let n = self.leaves.len();
        let mut paths = vec![Vec::new(); n];
        let root = build(&self.leaves, &mut paths);
        let count = n as u32;
        let sig = signer.sign(&batch_sig_input(&tree_id, epoch, count, &root));
        let sender = signer.signing_key().verifying_key();
        Ok(paths
            .into_iter()
            .zip(self.salts)
            .enumerate()
            .map(|(i, (path, salt))| BatchProof {
                sender,
                sig,
                count,
                index: i as u32,
                salt,
                path,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n).map(|i| leaf_hash(&[i as u8; 32], b"x")).collect()
    }

    #[test]
    fn shape_is_rfc9162() {
        assert_eq!(split(2), 1);
        assert_eq!(split(3), 2);
        assert_eq!(split(4), 2);
        assert_eq!(split(5), 4);
        assert_eq!(split(4096), 2048);
        assert_eq!(path_len(0, 1), Some(0));
        assert_eq!(path_len(2, 3), Some(1));
        assert_eq!(path_len(0, 3), Some(2));
        assert_eq!(path_len(4095, 4096), Some(12));
        assert_eq!(path_len(4096, 4096), None);
        assert_eq!(path_len(0, 4097), None);
        assert_eq!(path_len(0, 0), None);
        let l = leaves(3);
        assert_eq!(merkle_root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
    }

    #[test]
    fn paths_recompute_the_root() {
        for n in [1usize, 2, 3, 5, 7, 8, 13, 64, 100] {
            let l = leaves(n);
            let mut paths = vec![Vec::new(); n];
            let root = build(&l, &mut paths);
            assert_eq!(root, merkle_root(&l));
            for (i, p) in paths.iter().enumerate() {
                assert_eq!(Some(p.len()), path_len(i as u32, n as u32));
                let (dirs, d) = directions(i as u32, n as u32).unwrap();
                let mut h = l[i];
                for (j, s) in p.iter().enumerate() {
                    h = if dirs[d - 1 - j] {
                        node_hash(s, &h)
                    } else {
                        node_hash(&h, s)
                    };
                }
                assert_eq!(h, root, "n {n} i {i}");
            }
        }
    }
}
