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
use crate::keyring::FastMap;
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

/// The subtrees `[lo, hi)` holding leaf `index` of `count`, from the whole tree (depth 0)
/// down to the leaf itself (depth `d`), and `d`. `None` when `count` or `index` is out of
/// range. A node is named by its range: two proofs of one batch share a node exactly when
/// they name the same range.
fn ranges(index: u32, count: u32) -> Option<([(u32, u32); MAX_PATH + 1], usize)> {
    if count == 0 || count > MAX_BATCH || index >= count {
        return None;
    }
    let mut r = [(0, 0); MAX_PATH + 1];
    let (mut lo, mut hi, mut d) = (0u32, count, 0usize);
    r[0] = (lo, hi);
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            hi = lo + k;
        } else {
            lo += k;
        }
        d += 1;
        r[d] = (lo, hi);
    }
    Some((r, d))
}

/// The range of the sibling of the node at depth `k ≥ 1` (the other half of its parent).
fn sibling_range(r: &[(u32, u32); MAX_PATH + 1], k: usize) -> (u32, u32) {
    let (parent, me) = (r[k - 1], r[k]);
    if me.0 == parent.0 {
        (me.1, parent.1)
    } else {
        (parent.0, me.0)
    }
}

/// The path length a valid proof for leaf `index` of `count` has, or `None` when `count` is
/// not in `1..=4096` or `index ≥ count`.
pub fn path_len(index: u32, count: u32) -> Option<usize> {
    ranges(index, count).map(|(_, d)| d)
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

    /// The subtree ranges of this proof's leaf ([`ranges`]) and its depth, checking the
    /// count, the index and the path's length.
    fn shape(&self) -> Result<([(u32, u32); MAX_PATH + 1], usize), BodyError> {
        let (r, d) =
            ranges(self.index, self.count).ok_or(if self.count == 0 || self.count > MAX_BATCH {
                BodyError::BatchCount(self.count)
            } else {
                BodyError::BatchIndex {
                    index: self.index,
                    count: self.count,
                }
            })?;
        if self.path.len() != d {
            return Err(BodyError::BatchPathLength {
                len: self.path.len(),
                expected: d,
            });
        }
        Ok((r, d))
    }

    /// The parent of the node `h` at depth `k ≥ 1`, with this proof's sibling there.
    fn parent(&self, r: &[(u32, u32); MAX_PATH + 1], d: usize, k: usize, h: &[u8; 32]) -> [u8; 32] {
        let sib = &self.path[d - k];
        if r[k].0 == r[k - 1].0 {
            node_hash(h, sib)
        } else {
            node_hash(sib, h)
        }
    }

    /// The root this proof implies for a message whose §4.8 bytes are `sig_input`.
    pub fn root(&self, sig_input: &[u8]) -> Result<[u8; 32], BodyError> {
        let (r, d) = self.shape()?;
        let mut h = leaf_hash(&self.salt, sig_input);
        for k in (1..=d).rev() {
            h = self.parent(&r, d, k, &h);
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
            Some(c) => self.verify_in(tree_id, epoch, sig_input, RootCache::Own(c), None),
            None => self.verify_in(tree_id, epoch, sig_input, RootCache::None, None),
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
        self.verify_in(tree_id, epoch, sig_input, RootCache::Shared(cache), None)
    }

    /// With `nodes` (an opener's [`BatchNodes`]): the climb from the leaf stops at the first
    /// node that an earlier verification of this batch authenticated at the same range —
    /// the rest of the path would reproduce a root whose signature already verified — so
    /// after the first message of a batch the others cost a leaf hash and about one node
    /// hash instead of the path's ⌈log2 count⌉.
    pub(crate) fn verify_in(
        &self,
        tree_id: &TreeId,
        epoch: u64,
        sig_input: &[u8],
        cache: RootCache<'_>,
        nodes: Option<&mut BatchNodes>,
    ) -> Result<SenderId, BodyError> {
        let (r, d) = self.shape()?;
        let id = BatchId {
            sender: self.sender.to_bytes(),
            tree: tree_id.0,
            epoch,
            count: self.count,
            sig: self.sig.to_bytes(),
        };
        let mut known = nodes.as_deref().and_then(|n| n.find(&id));
        // hs[k]: the node at depth k on the leaf's way up, for k = top..=d.
        let mut hs = [[0u8; 32]; MAX_PATH + 1];
        hs[d] = leaf_hash(&self.salt, sig_input);
        let mut top = d;
        let met = loop {
            if let Some(n) = known {
                if n.holds(r[top], &hs[top]) {
                    // The rest of the path must be the tree's own siblings (a recorded node's
                    // ancestors and their siblings are recorded too), so this accepts exactly
                    // what a cold climb to the signed root would; otherwise that climb decides.
                    if (1..=top).all(|k| n.holds(sibling_range(&r, k), &self.path[d - k])) {
                        break true;
                    }
                    known = None;
                }
            }
            if top == 0 {
                break false;
            }
            hs[top - 1] = self.parent(&r, d, top, &hs[top]);
            top -= 1;
        };
        let mut cache = cache;
        if met {
            match &mut cache {
                RootCache::None => {}
                RootCache::Own(c) => c.hits += 1,
                RootCache::Shared(c) => c.lock().hits += 1,
            }
        } else {
            let root = hs[0];
            let key = RootKey { id, root };
            let hit = match &mut cache {
                RootCache::None => false,
                RootCache::Own(c) => c.hit(&key),
                // The lock is held for the lookup only, never across the verification.
                RootCache::Shared(c) => c.lock().hit(&key),
            };
            if !hit {
                let m = batch_sig_input(tree_id, epoch, self.count, &root);
                self.sender
                    .verify_strict(&m, &self.sig)
                    .map_err(|_| BodyError::BadSignature)?;
                match cache {
                    RootCache::None => {}
                    RootCache::Own(c) => c.insert(key),
                    RootCache::Shared(c) => c.lock().insert(key),
                }
            }
        }
        // Now authenticated: the nodes computed on the way up and the siblings used.
        if let Some(n) = nodes {
            let computed = (top..=d).map(|k| (r[k], hs[k]));
            let siblings = (top + 1..=d).map(|k| (sibling_range(&r, k), self.path[d - k]));
            n.record(id, computed.chain(siblings));
        }
        Ok(SenderId(self.sender))
    }
}

/// What names one signed batch: the signer, tree, epoch, leaf count and signature (one
/// signature verifies for one root only, so the nodes recorded under it are one tree's).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BatchId {
    sender: [u8; 32],
    tree: [u8; 16],
    epoch: u64,
    count: u32,
    sig: [u8; 64],
}

/// The authenticated nodes of one verified batch, by range.
struct NodeSet {
    id: BatchId,
    nodes: FastMap<(u32, u32), [u8; 32]>,
}

impl NodeSet {
    fn holds(&self, range: (u32, u32), h: &[u8; 32]) -> bool {
        self.nodes.get(&range) == Some(h)
    }
}

/// An opener's record of the inner nodes (and leaves) of the last few batches whose root
/// verified: every node on a verified path, and every sibling that path used, is a node of
/// the signed tree (finding another value that hashes to the same parent is a BLAKE3
/// collision). Kept per opener, so no lock; bounded: [`BatchNodes::BATCHES`] batches of at
/// most `2 · count − 1` nodes each.
#[derive(Default)]
pub(crate) struct BatchNodes {
    batches: VecDeque<NodeSet>,
    /// Records nothing: an opener whose root cache is off ([`VerifiedRoots::new`]`(0)`)
    /// verifies every message's signature.
    off: bool,
}

impl fmt::Debug for BatchNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchNodes")
            .field("batches", &self.batches.len())
            .finish()
    }
}

impl BatchNodes {
    /// Batches remembered (messages of a batch arrive together; a few cover interleaved
    /// publishers).
    const BATCHES: usize = 4;

    /// A record that records nothing.
    pub(crate) fn off() -> Self {
        BatchNodes {
            batches: VecDeque::new(),
            off: true,
        }
    }

    /// Batches recorded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.batches.len()
    }

    fn find(&self, id: &BatchId) -> Option<&NodeSet> {
        self.batches.iter().find(|b| b.id == *id)
    }

    /// Adds authenticated nodes of batch `id` (made the most recent batch).
    fn record(&mut self, id: BatchId, nodes: impl Iterator<Item = ((u32, u32), [u8; 32])>) {
        if self.off {
            return;
        }
        let set = match self.batches.iter().position(|b| b.id == id) {
            Some(0) => &mut self.batches[0],
            Some(i) => {
                let b = self.batches.remove(i).expect("present");
                self.batches.push_front(b);
                &mut self.batches[0]
            }
            None => {
                self.batches.truncate(Self::BATCHES - 1);
                self.batches.push_front(NodeSet {
                    id,
                    nodes: FastMap::default(),
                });
                &mut self.batches[0]
            }
        };
        set.nodes.extend(nodes);
    }
}

/// A verified root: its batch and the root the signature covers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RootKey {
    id: BatchId,
    root: [u8; 32],
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

    /// A cache of at most `cap` roots (`0` disables caching: an [`Opener`](crate::Opener)
    /// given it also records no batch nodes, so every message's signature is verified).
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
    /// Whether it remembers roots (capacity above 0).
    pub fn is_enabled(&self) -> bool {
        self.cap > 0
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
        // Each path is as long as its leaf's depth (at most ⌈log2 n⌉): allocated once.
        let depth = (u32::BITS - (n as u32 - 1).leading_zeros()) as usize;
        let mut paths = vec![Vec::with_capacity(depth); n];
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
                let (r, d) = ranges(i as u32, n as u32).unwrap();
                assert_eq!((r[0], r[d]), ((0, n as u32), (i as u32, i as u32 + 1)));
                let mut h = l[i];
                for (j, s) in p.iter().enumerate() {
                    let k = d - j;
                    // Each sibling is the tree hash of the range `sibling_range` names,
                    // and each node the tree hash of its own range.
                    let (lo, hi) = sibling_range(&r, k);
                    assert_eq!(
                        *s,
                        merkle_root(&l[lo as usize..hi as usize]),
                        "n {n} i {i} k {k}"
                    );
                    h = if r[k].0 == r[k - 1].0 {
                        node_hash(&h, s)
                    } else {
                        node_hash(s, &h)
                    };
                    let (lo, hi) = r[k - 1];
                    assert_eq!(h, merkle_root(&l[lo as usize..hi as usize]));
                }
                assert_eq!(h, root, "n {n} i {i}");
            }
        }
    }

    /// Batch `n` of a fresh signer over inputs `"message i"`, epoch 1: (inputs, proofs).
    fn signed_batch(n: usize) -> (Vec<Vec<u8>>, Vec<BatchProof>) {
        let id = Identity::generate_with(&mut rand_core::OsRng);
        let inputs: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("message {i}").into_bytes())
            .collect();
        let salts: Vec<[u8; SALT_LEN]> = (0..n).map(|i| [i as u8 ^ 0x5a; SALT_LEN]).collect();
        let leaves: Vec<_> = inputs
            .iter()
            .zip(&salts)
            .map(|(m, s)| leaf_hash(s, m))
            .collect();
        let mut paths = vec![Vec::new(); n];
        let root = build(&leaves, &mut paths);
        let sig = id.sign(&batch_sig_input(&TREE, 1, n as u32, &root));
        let sender = id.signing_key().verifying_key();
        let proofs = paths
            .into_iter()
            .zip(salts)
            .enumerate()
            .map(|(i, (path, salt))| BatchProof {
                sender,
                sig,
                count: n as u32,
                index: i as u32,
                salt,
                path,
            })
            .collect();
        (inputs, proofs)
    }

    const TREE: TreeId = TreeId([7; 16]);

    fn warm(
        p: &BatchProof,
        input: &[u8],
        roots: &mut VerifiedRoots,
        nodes: &mut BatchNodes,
    ) -> bool {
        p.verify_in(&TREE, 1, input, RootCache::Own(roots), Some(nodes))
            .is_ok()
    }

    fn cold(p: &BatchProof, input: &[u8]) -> bool {
        p.verify_in(&TREE, 1, input, RootCache::None, None).is_ok()
    }

    #[test]
    fn a_batch_costs_one_signature_check_and_about_two_hashes_a_message() {
        for n in [1usize, 2, 3, 5, 8, 13, 64] {
            let (inputs, proofs) = signed_batch(n);
            let (mut roots, mut nodes) = (VerifiedRoots::new(16), BatchNodes::default());
            // Out of order too: the last message first, then the rest.
            for i in std::iter::once(n - 1).chain(0..n - 1) {
                assert!(
                    warm(&proofs[i], &inputs[i], &mut roots, &mut nodes),
                    "n {n} i {i}"
                );
            }
            assert_eq!((roots.len(), roots.hits()), (1, n as u64 - 1), "n {n}");
            // Every node of the tree is known after the whole batch: 2n − 1 of them.
            let set = nodes.find(&BatchId {
                sender: proofs[0].sender.to_bytes(),
                tree: TREE.0,
                epoch: 1,
                count: n as u32,
                sig: proofs[0].sig.to_bytes(),
            });
            assert_eq!(set.map(|s| s.nodes.len()), Some(2 * n - 1), "n {n}");
        }
    }

    /// A cached root is keyed by every value the signature covers plus the signer and the
    /// signature (§4.14): with the batch verified (root cache and batch nodes warm), a proof
    /// that changes only the signer, one signature bit, the count (to one of the same shape,
    /// so the same root), the tree or the epoch is refused exactly as a cold verification
    /// refuses it — never accepted on the strength of the cached root.
    #[test]
    fn a_cached_root_verifies_for_no_other_sender_signature_count_tree_or_epoch() {
        let (inputs, proofs) = signed_batch(5);
        let p = &proofs[0];
        let input = &inputs[0];
        // Index 0 of 5 and of 8 take the same sides at each of 3 levels: one root.
        assert_eq!(path_len(0, 8), path_len(0, 5));
        let root = p.root(input).unwrap();
        let mut other_sender = p.clone();
        other_sender.sender = Identity::generate_with(&mut rand_core::OsRng)
            .signing_key()
            .verifying_key();
        let mut other_sig = p.clone();
        let mut sig = p.sig.to_bytes();
        sig[40] ^= 1;
        other_sig.sig = Signature::from_bytes(&sig);
        let mut other_count = p.clone();
        other_count.count = 8;
        assert_eq!(other_count.root(input), Ok(root), "same root, other count");
        let other_tree = TreeId([8; 16]);
        let damaged: [(&str, &BatchProof, &TreeId, u64); 5] = [
            ("sender", &other_sender, &TREE, 1),
            ("signature", &other_sig, &TREE, 1),
            ("count", &other_count, &TREE, 1),
            ("tree", p, &other_tree, 1),
            ("epoch", p, &TREE, 2),
        ];
        for (what, q, tree, epoch) in damaged {
            let mut roots = VerifiedRoots::new(16);
            let mut nodes = BatchNodes::default();
            // The honest proof, cold then warm: the root and the batch's nodes are held.
            assert!(cold(p, input));
            assert!(warm(p, input, &mut roots, &mut nodes));
            assert!(warm(p, input, &mut roots, &mut nodes));
            assert_eq!((roots.len(), roots.hits(), nodes.len()), (1, 1, 1));
            assert!(
                q.verify_in(tree, epoch, input, RootCache::None, None)
                    .is_err(),
                "{what}: cold"
            );
            assert!(
                q.verify_in(tree, epoch, input, RootCache::Own(&mut roots), None)
                    .is_err(),
                "{what}: root cache"
            );
            assert!(
                q.verify_in(tree, epoch, input, RootCache::None, Some(&mut nodes))
                    .is_err(),
                "{what}: batch nodes"
            );
            assert!(
                q.verify_in(
                    tree,
                    epoch,
                    input,
                    RootCache::Own(&mut roots),
                    Some(&mut nodes)
                )
                .is_err(),
                "{what}: both"
            );
            let shared = SharedRoots::new(16);
            assert!(p
                .verify_in(&TREE, 1, input, RootCache::Shared(&shared), None)
                .is_ok());
            assert!(
                q.verify_in(tree, epoch, input, RootCache::Shared(&shared), None)
                    .is_err(),
                "{what}: shared root cache"
            );
            assert_eq!(roots.hits(), 1, "{what}: no hit for the damaged proof");
            // Only verified roots are inserted: a refused proof leaves nothing to hit later.
            assert_eq!(roots.len(), 1, "{what}: a refused root was cached");
            assert_eq!(shared.lock().len(), 1, "{what}: a refused root was shared");
        }
    }

    proptest::proptest! {
        /// A warm opener (its batch's nodes recorded) accepts exactly what a cold one does,
        /// for proofs damaged in any one field: the input, salt, index, count, a path hash,
        /// the path's length, or another message's path.
        #[test]
        fn warm_and_cold_openers_agree_on_damaged_proofs(
            n in 1usize..40,
            pick in 0usize..1000,
            field in 0u8..7,
            at in 0usize..1000,
            bit in 0u8..8,
        ) {
            let (inputs, proofs) = signed_batch(n);
            let (mut roots, mut nodes) = (VerifiedRoots::new(16), BatchNodes::default());
            // Warm up on every message but the one to damage.
            let i = pick % n;
            for j in (0..n).filter(|j| *j != i) {
                proptest::prop_assert!(warm(&proofs[j], &inputs[j], &mut roots, &mut nodes));
            }
            let mut p = proofs[i].clone();
            let mut input = inputs[i].clone();
            match field {
                0 => {
                    let k = at % input.len();
                    input[k] ^= 1 << bit;
                }
                1 => p.salt[at % SALT_LEN] ^= 1 << bit,
                2 => p.index = (at % n) as u32,
                3 => p.count = (at % (n + 2)) as u32 + 1,
                4 if !p.path.is_empty() => {
                    let k = at % p.path.len();
                    p.path[k][at % 32] ^= 1 << bit;
                }
                5 => { p.path.pop(); }
                6 => p.path = proofs[at % n].path.clone(),
                _ => {}
            }
            let cold_ok = cold(&p, &input);
            proptest::prop_assert_eq!(warm(&p, &input, &mut roots, &mut nodes), cold_ok);
            // Undamaged (or damaged into itself): accepted by both.
            proptest::prop_assert_eq!(cold_ok, p == proofs[i] && input == inputs[i]);
        }
    }
}
