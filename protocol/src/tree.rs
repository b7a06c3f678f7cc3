//! Topic trees: a random tree id, an epoch, a fresh root per epoch, and everything derived
//! from it (DESIGN §4, CRYPTO.md "Tree keys").
//!
//! ```text
//! B      = kh(root_e, 0x01 ‖ tree_id ‖ u64be(epoch))
//! R      = kh(B, 0x02)            routing key: tokens and key id
//! N      = kh(B, 0x03)            name key: sealed topic names
//! S("")  = kh(B, 0x04)            whole-tree subtree key
//! S(p/s) = kh(S(p), 0x05 ‖ lp(s)) subtree key — a grant for p/s/# is S(p/s)
//! M(t)   = kh(S(t), 0x06)         message key of exactly topic t — a grant for t alone
//! key_id = xof(R, 0x08 ‖ tree_id ‖ u64be(epoch), 16)
//! C(k)   = kh(k, 0x0C)            commitment to a grant key (signed, never the key)
//! ```
//! The admin signs an *epoch certificate* `(tree_id, epoch, flags, name, admin, R, N,
//! prev_cutoff_ms, not_after_ms)` and every grant it mints `(tree_id, epoch, scope, C(key))`.
//! A holder may narrow a grant and hand it on; the narrowed grant records the narrower's
//! public key and signature (and the parent scope), so a receiver knows who vouches for it.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::error_keys::KeyError;
use crate::identity::{Identity, SenderId};
use crate::kdf::{kh, lp, tag, xof, Secret32};
use crate::limits::TOKEN_LEN;
use crate::text::{self, hrp, put_lp, Cursor};
use crate::token::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};
use crate::topic::{FilterLevel, Topic, TopicFilter};

/// Format version of grant (`wskey`) and tree key (`wstree`) strings.
pub const KEY_FORMAT: u8 = 2;
const FORMAT_V1: u8 = 1;
const CERT_CONTEXT: &[u8] = b"whispeer/v2/epoch-cert\0";
const GRANT_CONTEXT: &[u8] = b"whispeer/v2/grant\0";
const NARROW_CONTEXT: &[u8] = b"whispeer/v2/grant-narrow\0";
/// Epoch certificate flag: the tree is derived from a passphrase (epoch 0 only).
pub const CERT_FLAG_PASSPHRASE: u8 = 0x01;
const NO_LIMIT: u64 = u64::MAX;
const AUTH_ADMIN: u8 = 1;
const AUTH_NARROWED: u8 = 2;
/// Longest tree name (a label for people; the tree id is what identifies a tree).
pub const MAX_TREE_NAME: usize = 128;
/// Longest passphrase realm.
pub const MAX_REALM: usize = 128;

/// A tree's random 16-byte id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TreeId(pub [u8; 16]);

impl TreeId {
    /// A fresh random id.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        TreeId(b)
    }
    /// The id a passphrase tree uses: the first 16 bytes of
    /// `BLAKE3-derive_key("whispeer v1 tree id", tree_name)`.
    pub fn from_name(tree_name: &str) -> Self {
        let k = blake3::derive_key("whispeer v1 tree id", tree_name.as_bytes());
        TreeId(k[..16].try_into().expect("16 bytes"))
    }
    /// The id of a passphrase tree in a realm: [`TreeId::from_name`] for the empty realm,
    /// else the first 16 bytes of `BLAKE3-derive_key("whispeer v2 realm tree id",
    /// lp(realm) ‖ tree_name)`.
    pub fn from_name_in_realm(realm: &str, tree_name: &str) -> Self {
        if realm.is_empty() {
            return Self::from_name(tree_name);
        }
        let mut m = Vec::with_capacity(2 + realm.len() + tree_name.len());
        put_lp(&mut m, realm.as_bytes());
        m.extend_from_slice(tree_name.as_bytes());
        let k = blake3::derive_key("whispeer v2 realm tree id", &m);
        TreeId(k[..16].try_into().expect("16 bytes"))
    }
}

impl fmt::Display for TreeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
impl fmt::Debug for TreeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeId({self})")
    }
}

/// The refusal of an end (`not_after_ms`) on a passphrase tree. Every member derives the
/// admin key (§5.9), so an end one member signs would cut every other member off for whoever
/// accepts her grant (keyrings keep the earliest end of an epoch); the honest API never sets
/// one, so the certificate, the tree key string and the keyring all refuse it.
pub(crate) fn passphrase_end_refused(kind: &'static str) -> KeyError {
    KeyError::InvalidString {
        kind,
        reason: "a passphrase tree has no end (not_after must be none): every member \
                 knows its admin key"
            .into(),
    }
}

fn check_tree_name(name: &str) -> Result<(), KeyError> {
    if name.len() > MAX_TREE_NAME {
        return Err(KeyError::InvalidTreeName("longer than 128 bytes"));
    }
    Ok(())
}

/// The keys of one epoch that every member holds: routing key R, name key N, key id.
#[derive(Clone)]
pub struct EpochKeys {
    tree_id: TreeId,
    epoch: u64,
    routing: Secret32,
    name: Secret32,
    key_id: KeyId,
}

impl fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKeys")
            .field("tree_id", &self.tree_id)
            .field("epoch", &self.epoch)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for EpochKeys {
    fn eq(&self, o: &Self) -> bool {
        self.tree_id == o.tree_id
            && self.epoch == o.epoch
            && self.routing == o.routing
            && self.name == o.name
    }
}
impl Eq for EpochKeys {}

impl EpochKeys {
    fn new(tree_id: TreeId, epoch: u64, routing: Secret32, name: Secret32) -> Self {
        let mut id = [0u8; TOKEN_LEN];
        xof(
            routing.as_bytes(),
            tag::KEY_ID,
            &[&tree_id.0, &epoch.to_be_bytes()],
            &mut id,
        );
        Self {
            tree_id,
            epoch,
            routing,
            name,
            key_id: KeyId::from_bytes(id),
        }
    }
    #[cfg(test)]
    pub(crate) fn with_key_id_for_tests(mut self, id: KeyId) -> Self {
        self.key_id = id;
        self
    }
    /// The tree.
    pub fn tree_id(&self) -> TreeId {
        self.tree_id
    }
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The key id naming (tree, epoch) on the wire.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
    pub(crate) fn name_key(&self) -> &Secret32 {
        &self.name
    }
    /// `T(level, segment)`.
    pub fn token(&self, level: usize, segment: &str) -> TopicToken {
        let mut t = [0u8; TOKEN_LEN];
        let s = segment.as_bytes();
        xof(
            self.routing.as_bytes(),
            tag::TOKEN,
            &[&(level as u16).to_be_bytes(), &lp(s), s],
            &mut t,
        );
        TopicToken::from_bytes(t)
    }
    /// One token per level of `topic`.
    pub fn tokens(&self, topic: &Topic) -> Vec<TopicToken> {
        topic
            .segments()
            .enumerate()
            .map(|(i, s)| self.token(i, s))
            .collect()
    }
    /// The routing path of `topic` in this epoch.
    pub fn token_path(&self, topic: &Topic) -> TokenPath {
        TokenPath::new(self.key_id, self.tokens(topic)).expect("a valid topic has 1..=32 levels")
    }
    /// Compiles a filter to the token pattern the relay matches.
    pub fn compile(&self, filter: &TopicFilter) -> TokenPattern {
        let elems = filter
            .levels()
            .enumerate()
            .map(|(i, l)| match l {
                FilterLevel::Exact(s) => PatternElem::Token(self.token(i, s)),
                FilterLevel::One => PatternElem::One,
                FilterLevel::Rest => PatternElem::Rest,
            })
            .collect();
        TokenPattern::new(self.key_id, elems).expect("a valid filter compiles to a valid pattern")
    }
}

/// The admin-signed statement "tree `tree_id` at `epoch` has routing key R and name key N",
/// with the rotation cutoff of the epochs before it and an optional end of its own.
#[derive(Clone)]
pub struct EpochCert {
    keys: EpochKeys,
    flags: u8,
    tree_name: String,
    admin: VerifyingKey,
    prev_cutoff_ms: u64,
    not_after_ms: u64,
    sig: Signature,
}

impl fmt::Debug for EpochCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochCert")
            .field("tree_name", &self.tree_name)
            .field("keys", &self.keys)
            .field("admin", &SenderId(self.admin))
            .field("passphrase", &self.is_passphrase())
            .field("prev_cutoff_ms", &self.prev_cutoff_ms)
            .field("not_after_ms", &self.not_after_ms())
            .finish()
    }
}

struct CertFields<'a> {
    tree_id: &'a TreeId,
    epoch: u64,
    flags: u8,
    name: &'a str,
    admin: &'a VerifyingKey,
    r: &'a Secret32,
    n: &'a Secret32,
    prev_cutoff_ms: u64,
    not_after_ms: u64,
}

impl CertFields<'_> {
    /// The certificate body: what is written and (after the context) signed.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tree_id.0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.push(self.flags);
        put_lp(out, self.name.as_bytes());
        out.extend_from_slice(self.admin.as_bytes());
        out.extend_from_slice(self.r.as_bytes());
        out.extend_from_slice(self.n.as_bytes());
        out.extend_from_slice(&self.prev_cutoff_ms.to_be_bytes());
        out.extend_from_slice(&self.not_after_ms.to_be_bytes());
    }
    fn sig_input(&self) -> Zeroizing<Vec<u8>> {
        let mut m = Zeroizing::new(CERT_CONTEXT.to_vec());
        self.write(&mut m);
        m
    }
    fn check(&self) -> Result<(), KeyError> {
        if self.flags & !CERT_FLAG_PASSPHRASE != 0 {
            return Err(KeyError::InvalidString {
                kind: "epoch certificate",
                reason: format!("unknown flags 0x{:02x}", self.flags),
            });
        }
        if self.flags & CERT_FLAG_PASSPHRASE != 0 && self.epoch > 0 {
            return Err(KeyError::PassphraseEpoch {
                tree: self.tree_id.to_string(),
                epoch: self.epoch,
            });
        }
        if self.epoch == 0 && self.prev_cutoff_ms != 0 {
            return Err(KeyError::InvalidString {
                kind: "epoch certificate",
                reason: "epoch 0 has no previous epoch to cut off".into(),
            });
        }
        if self.flags & CERT_FLAG_PASSPHRASE != 0 && self.not_after_ms != NO_LIMIT {
            return Err(passphrase_end_refused("epoch certificate"));
        }
        Ok(())
    }
}

impl EpochCert {
    fn fields(&self) -> CertFields<'_> {
        CertFields {
            tree_id: &self.keys.tree_id,
            epoch: self.keys.epoch,
            flags: self.flags,
            name: &self.tree_name,
            admin: &self.admin,
            r: &self.keys.routing,
            n: &self.keys.name,
            prev_cutoff_ms: self.prev_cutoff_ms,
            not_after_ms: self.not_after_ms,
        }
    }
    /// The epoch's public-to-members keys.
    pub fn keys(&self) -> &EpochKeys {
        &self.keys
    }
    /// The tree's display name.
    pub fn tree_name(&self) -> &str {
        &self.tree_name
    }
    /// The admin's public key (pinned by clients at the first grant of a tree).
    pub fn admin(&self) -> SenderId {
        SenderId(self.admin)
    }
    /// A passphrase tree (its admin key is known to every member; only epoch 0 exists).
    pub fn is_passphrase(&self) -> bool {
        self.flags & CERT_FLAG_PASSPHRASE != 0
    }
    /// Messages of any earlier epoch dated at or after this time (Unix ms) are refused once
    /// this certificate is held (0 for epoch 0: nothing to cut off).
    pub fn prev_cutoff_ms(&self) -> u64 {
        self.prev_cutoff_ms
    }
    /// Messages of this epoch dated after this time are refused.
    pub fn not_after_ms(&self) -> Option<u64> {
        (self.not_after_ms != NO_LIMIT).then_some(self.not_after_ms)
    }
    fn write(&self, out: &mut Vec<u8>) {
        self.fields().write(out);
        out.extend_from_slice(&self.sig.to_bytes());
    }
    fn read(c: &mut Cursor<'_>) -> Result<Self, KeyError> {
        let tree_id = TreeId(c.arr()?);
        let epoch = c.u64()?;
        let flags = c.u8()?;
        let tree_name = c.lp_str()?;
        check_tree_name(&tree_name)?;
        let admin = VerifyingKey::from_bytes(&c.arr()?)
            .map_err(|_| KeyError::InvalidPublicKey("epoch certificate"))?;
        let r = Secret32(c.arr()?);
        let n = Secret32(c.arr()?);
        let prev_cutoff_ms = c.u64()?;
        let not_after_ms = c.u64()?;
        let sig = Signature::from_bytes(&c.arr()?);
        let f = CertFields {
            tree_id: &tree_id,
            epoch,
            flags,
            name: &tree_name,
            admin: &admin,
            r: &r,
            n: &n,
            prev_cutoff_ms,
            not_after_ms,
        };
        admin
            .verify_strict(&f.sig_input(), &sig)
            .map_err(|_| KeyError::BadSignature("epoch certificate"))?;
        f.check()?;
        Ok(EpochCert {
            keys: EpochKeys::new(tree_id, epoch, r, n),
            flags,
            tree_name,
            admin,
            prev_cutoff_ms,
            not_after_ms,
            sig,
        })
    }
}

/// Where a held grant's key comes from, as far as the receiver can tell.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Provenance {
    /// The tree admin signed this grant (scope and key commitment).
    AdminSigned,
    /// The keyring re-derived the same key from a broader verified grant it holds.
    Derived {
        /// The scope of that broader grant.
        from: Scope,
    },
    /// Narrowed and handed on by this identity; nothing the keyring holds can confirm it.
    /// Opens messages, seals only after an explicit opt-in.
    Delegated {
        /// Who narrowed it.
        by: SenderId,
    },
}

impl Provenance {
    /// Admin-signed or derived and checked.
    pub fn is_verified(&self) -> bool {
        !matches!(self, Provenance::Delegated { .. })
    }
    /// Larger is more trustworthy (used to report the best grant that opened a message).
    pub(crate) fn rank(&self) -> u8 {
        match self {
            Provenance::AdminSigned => 2,
            Provenance::Derived { .. } => 1,
            Provenance::Delegated { .. } => 0,
        }
    }
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::AdminSigned => f.write_str("admin-signed"),
            Provenance::Derived { from } => write!(f, "derived from '{from}'"),
            Provenance::Delegated { by } => write!(f, "delegated by {by}"),
        }
    }
}

/// What a grant lets its holder read and write.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Scope {
    /// The whole tree (`#`): key `S("")`.
    Tree,
    /// A subtree `prefix/#` (the prefix topic itself included): key `S(prefix)`.
    Subtree(Topic),
    /// Exactly one topic: key `M(topic)`.
    Topic(Topic),
}

impl Scope {
    /// Does this scope cover `topic`?
    pub fn covers(&self, topic: &Topic) -> bool {
        match self {
            Scope::Tree => true,
            Scope::Subtree(p) => topic.is_under(p),
            Scope::Topic(t) => t == topic,
        }
    }
    /// Larger is more specific (used to pick among grants).
    pub fn specificity(&self) -> usize {
        match self {
            Scope::Tree => 0,
            Scope::Subtree(p) => 2 * p.levels(),
            Scope::Topic(t) => 2 * t.levels() + 1,
        }
    }
    /// Does this scope contain all of `other` (equal scopes included)?
    pub fn contains(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Tree, _) => true,
            (Scope::Subtree(p), Scope::Subtree(q)) => q.is_under(p),
            (Scope::Subtree(p), Scope::Topic(t)) => t.is_under(p),
            (Scope::Topic(a), Scope::Topic(b)) => a == b,
            _ => false,
        }
    }
    /// The scope kind byte on the wire: 0 tree, 1 subtree, 2 topic.
    pub fn kind_byte(&self) -> u8 {
        match self {
            Scope::Tree => 0,
            Scope::Subtree(_) => 1,
            Scope::Topic(_) => 2,
        }
    }
    /// The scope path on the wire (empty for the whole tree).
    pub fn path(&self) -> &str {
        match self {
            Scope::Tree => "",
            Scope::Subtree(p) => p.as_str(),
            Scope::Topic(t) => t.as_str(),
        }
    }
    fn read(c: &mut Cursor<'_>, what: &'static str) -> Result<Scope, KeyError> {
        let kind = c.u8()?;
        let path = c.lp_str()?;
        match kind {
            0 if path.is_empty() => Ok(Scope::Tree),
            1 => Ok(Scope::Subtree(Topic::new(path)?)),
            2 => Ok(Scope::Topic(Topic::new(path)?)),
            0 => Err(KeyError::InvalidString {
                kind: what,
                reason: "a whole-tree scope has no path".into(),
            }),
            _ => Err(KeyError::InvalidString {
                kind: what,
                reason: "unknown scope kind".into(),
            }),
        }
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.kind_byte());
        put_lp(out, self.path().as_bytes());
    }
    /// Could a topic matching `filter` be covered?
    pub fn intersects(&self, filter: &TopicFilter) -> bool {
        match self {
            Scope::Tree => true,
            Scope::Subtree(p) => filter.intersects_subtree(p),
            Scope::Topic(t) => filter.matches(t),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Tree => f.write_str("#"),
            Scope::Subtree(p) => write!(f, "{p}/#"),
            Scope::Topic(t) => write!(f, "{t}"),
        }
    }
}

fn subtree_root(base: &Secret32) -> Secret32 {
    kh(base.as_bytes(), tag::SUBTREE_ROOT, &[])
}
fn subtree_child(parent: &Secret32, seg: &str) -> Secret32 {
    kh(
        parent.as_bytes(),
        tag::SUBTREE,
        &[&lp(seg.as_bytes()), seg.as_bytes()],
    )
}
fn message_key(s: &Secret32) -> Secret32 {
    kh(s.as_bytes(), tag::MESSAGE, &[])
}

fn grant_commitment(key: &Secret32) -> [u8; 32] {
    *kh(key.as_bytes(), tag::GRANT_COMMIT, &[]).as_bytes()
}

/// What a grant's signer signs: `ctx ‖ tree_id ‖ u64be(epoch) ‖ kind ‖ lp(path) ‖ C(key)`,
/// and for a narrowed grant also `‖ parent_kind ‖ lp(parent_path)`.
fn grant_sig_input(
    ctx: &[u8],
    keys: &EpochKeys,
    scope: &Scope,
    key: &Secret32,
    parent: Option<&Scope>,
) -> Vec<u8> {
    let mut m = ctx.to_vec();
    m.extend_from_slice(&keys.tree_id.0);
    m.extend_from_slice(&keys.epoch.to_be_bytes());
    scope.write(&mut m);
    m.extend_from_slice(&grant_commitment(key));
    if let Some(p) = parent {
        p.write(&mut m);
    }
    m
}

/// Who vouches for a grant.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // both variants are small; boxing buys nothing here
enum GrantAuth {
    /// The admin's signature.
    Admin(Signature),
    /// Narrowed from `parent` by `by`.
    Narrowed {
        parent: Scope,
        by: VerifyingKey,
        sig: Signature,
    },
}

/// A key for part of a tree, with the signed epoch certificate and the signature of whoever
/// minted it (the admin, or the holder who narrowed it). Holders may derive narrower grants
/// ([`Grant::narrow`]) and hand them on; nobody can derive a sibling or a parent.
#[derive(Clone)]
pub struct Grant {
    cert: EpochCert,
    scope: Scope,
    key: Secret32,
    auth: GrantAuth,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("scope", &self.scope)
            .field("cert", &self.cert)
            .field("claim", &self.claimed_provenance())
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// The epoch certificate.
    pub fn cert(&self) -> &EpochCert {
        &self.cert
    }
    /// The epoch keys (R, N, key id).
    pub fn epoch_keys(&self) -> &EpochKeys {
        &self.cert.keys
    }
    /// The grant's key (what its derivations start from).
    pub(crate) fn secret(&self) -> &Secret32 {
        &self.key
    }
    /// What this grant covers.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }
    /// What the grant itself proves: [`Provenance::AdminSigned`], or
    /// [`Provenance::Delegated`] by its narrower (a keyring may upgrade the latter to
    /// [`Provenance::Derived`]).
    pub fn claimed_provenance(&self) -> Provenance {
        match &self.auth {
            GrantAuth::Admin(_) => Provenance::AdminSigned,
            GrantAuth::Narrowed { by, .. } => Provenance::Delegated { by: SenderId(*by) },
        }
    }
    /// The scope a narrowed grant was narrowed from (`None` for an admin-signed grant).
    pub fn narrowed_from(&self) -> Option<&Scope> {
        match &self.auth {
            GrantAuth::Admin(_) => None,
            GrantAuth::Narrowed { parent, .. } => Some(parent),
        }
    }
    /// `C(key) = kh(key, 0x0C)`: the commitment the signer signed.
    pub fn key_commitment(&self) -> [u8; 32] {
        grant_commitment(&self.key)
    }
    /// Does this grant hold the same key as `other` (same tree, epoch and scope assumed)?
    pub(crate) fn same_key(&self, other: &Secret32) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.key.as_bytes().ct_eq(other.as_bytes()))
    }
    /// `M(topic)` if the scope covers `topic`.
    pub fn message_key(&self, topic: &Topic) -> Option<Secret32> {
        match &self.scope {
            Scope::Topic(t) => (t == topic).then(|| self.key.clone()),
            Scope::Tree => Some(message_key(&Self::descend(&self.key, topic.segments()))),
            Scope::Subtree(p) => {
                if !topic.is_under(p) {
                    return None;
                }
                Some(message_key(&Self::descend(
                    &self.key,
                    topic.segments().skip(p.levels()),
                )))
            }
        }
    }
    /// The key of `scope` if this grant's scope contains it.
    pub(crate) fn key_for(&self, scope: &Scope) -> Option<Secret32> {
        if !self.scope.contains(scope) {
            return None;
        }
        match scope {
            Scope::Topic(t) => self.message_key(t),
            Scope::Tree => Some(self.key.clone()),
            Scope::Subtree(q) => {
                let skip = match &self.scope {
                    Scope::Subtree(p) => p.levels(),
                    _ => 0,
                };
                Some(Self::descend(&self.key, q.segments().skip(skip)))
            }
        }
    }
    fn descend<'a>(start: &Secret32, segs: impl Iterator<Item = &'a str>) -> Secret32 {
        let mut k = start.clone();
        for s in segs {
            k = subtree_child(&k, s);
        }
        k
    }
    fn target_scope(sub: &Topic, exact: bool) -> Scope {
        if exact {
            Scope::Topic(sub.clone())
        } else {
            Scope::Subtree(sub.clone())
        }
    }
    /// A narrower grant, signed by `by` (who hands it on): `sub` must lie within this
    /// grant's scope. `exact` asks for a single-topic grant (`M(sub)`) rather than a subtree
    /// (`S(sub)`). The result records `by` and this grant's scope; a receiver treats it as
    /// delegated unless it can derive the same key itself. An admin mints admin-signed
    /// grants with [`TreeKey::grant`] instead.
    pub fn narrow(&self, sub: &Topic, exact: bool, by: &Identity) -> Result<Grant, KeyError> {
        let scope = Self::target_scope(sub, exact);
        if scope == self.scope {
            return Ok(self.clone());
        }
        let key = self.key_for(&scope).ok_or_else(|| KeyError::OutOfScope {
            scope: self.scope.to_string(),
            target: sub.to_string(),
        })?;
        let sig = by.sign(&grant_sig_input(
            NARROW_CONTEXT,
            &self.cert.keys,
            &scope,
            &key,
            Some(&self.scope),
        ));
        Ok(Grant {
            cert: self.cert.clone(),
            scope,
            key,
            auth: GrantAuth::Narrowed {
                parent: self.scope.clone(),
                by: by.signing_key().verifying_key(),
                sig,
            },
        })
    }

    /// Binary form (inside key strings and invites).
    pub(crate) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(400));
        b.push(KEY_FORMAT);
        self.cert.write(&mut b);
        self.scope.write(&mut b);
        b.extend_from_slice(self.key.as_bytes());
        match &self.auth {
            GrantAuth::Admin(sig) => {
                b.push(AUTH_ADMIN);
                b.extend_from_slice(&sig.to_bytes());
            }
            GrantAuth::Narrowed { parent, by, sig } => {
                b.push(AUTH_NARROWED);
                parent.write(&mut b);
                b.extend_from_slice(by.as_bytes());
                b.extend_from_slice(&sig.to_bytes());
            }
        }
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Result<Grant, KeyError> {
        let mut c = Cursor::new(b, "grant");
        let v = c.u8()?;
        if v == FORMAT_V1 {
            return Err(KeyError::OldVersion {
                kind: "grant",
                version: v,
            });
        }
        if v != KEY_FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "grant",
                version: v,
            });
        }
        let cert = EpochCert::read(&mut c)?;
        let scope = Scope::read(&mut c, "grant")?;
        let key = Secret32(c.arr()?);
        let auth = match c.u8()? {
            AUTH_ADMIN => {
                let sig = Signature::from_bytes(&c.arr()?);
                cert.admin
                    .verify_strict(
                        &grant_sig_input(GRANT_CONTEXT, &cert.keys, &scope, &key, None),
                        &sig,
                    )
                    .map_err(|_| KeyError::BadSignature("grant (admin)"))?;
                GrantAuth::Admin(sig)
            }
            AUTH_NARROWED => {
                let parent = Scope::read(&mut c, "grant")?;
                if !parent.contains(&scope) || parent == scope {
                    return Err(KeyError::InvalidString {
                        kind: "grant",
                        reason: "the parent scope does not contain the narrowed scope".into(),
                    });
                }
                let by = VerifyingKey::from_bytes(&c.arr()?)
                    .map_err(|_| KeyError::InvalidPublicKey("grant narrower"))?;
                let sig = Signature::from_bytes(&c.arr()?);
                by.verify_strict(
                    &grant_sig_input(NARROW_CONTEXT, &cert.keys, &scope, &key, Some(&parent)),
                    &sig,
                )
                .map_err(|_| KeyError::BadSignature("grant (narrower)"))?;
                GrantAuth::Narrowed { parent, by, sig }
            }
            _ => {
                return Err(KeyError::InvalidString {
                    kind: "grant",
                    reason: "unknown grant signer kind".into(),
                })
            }
        };
        c.finish()?;
        Ok(Grant {
            cert,
            scope,
            key,
            auth,
        })
    }

    /// The key string (`wskey1…`). Anyone holding it can read and write its scope.
    pub fn to_key_string(&self) -> Zeroizing<String> {
        Zeroizing::new(text::encode(hrp::GRANT, &self.to_bytes()))
    }

    /// Parses a key string and verifies the epoch certificate's and the grant's signatures.
    pub fn from_key_string(s: &str) -> Result<Grant, KeyError> {
        let b = Zeroizing::new(text::decode(hrp::GRANT, s)?);
        Grant::from_bytes(&b)
    }
}

impl FromStr for Grant {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Grant::from_key_string(s)
    }
}

/// Argon2id parameters for passphrase trees (fixed by the spec, §5.9: a passphrase tree takes
/// only [`PassphraseParams::SPEC`], the default, or [`PassphraseParams::V1`] — see
/// [`PassphraseParams::check`]; locked secret strings, [`crate::locked`], take others within
/// their own ceilings).
///
/// The default, 256 MiB and 2 passes, is as far as a browser tolerates: measured with
/// `client-wasm/bench/argon2.mjs` on a 2-core machine it takes about 1.1 s in Node.js and
/// 1.0 s in Chromium (64 MiB / t=3, the version-1 default, took 0.3 s — four times cheaper
/// for an offline guesser holding a key id). 512 MiB took 1.5–2.1 s and fails on phones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassphraseParams {
    /// Memory in KiB (default 262144 = 256 MiB).
    pub m_kib: u32,
    /// Iterations (default 2).
    pub t: u32,
    /// Lanes (default 1: WebAssembly is single-threaded).
    pub p: u32,
}

impl Default for PassphraseParams {
    fn default() -> Self {
        PassphraseParams::SPEC
    }
}

impl PassphraseParams {
    /// The parameters PROTOCOL §5.9 fixes for a passphrase tree (the default): m = 262144 KiB
    /// (256 MiB), t = 2, p = 1.
    pub const SPEC: PassphraseParams = PassphraseParams {
        m_kib: 256 * 1024,
        t: 2,
        p: 1,
    };

    /// The version-1 parameters, still allowed by §5.9 to reproduce a passphrase tree made by
    /// a version-1 client: m = 65536 KiB (64 MiB), t = 3, p = 1.
    pub const V1: PassphraseParams = PassphraseParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };

    /// Checks these are parameters PROTOCOL §5.9 allows a passphrase tree:
    /// [`PassphraseParams::SPEC`] or [`PassphraseParams::V1`], nothing else.
    ///
    /// The spec fixes the values (every member MUST use them), so there is no range: a
    /// cheaper cost makes offline guessing from a key id cheaper, a costlier one (or one
    /// from untrusted input) could exhaust memory or time, and either way no other client
    /// derives that tree. [`TreeKey::from_passphrase`] and
    /// [`TreeKey::from_passphrase_in_realm`] refuse anything else with
    /// [`KeyError::PassphraseParams`] before Argon2 runs.
    pub fn check(self) -> Result<(), KeyError> {
        if self == Self::SPEC || self == Self::V1 {
            return Ok(());
        }
        Err(KeyError::PassphraseParams {
            m_kib: self.m_kib,
            t: self.t,
            p: self.p,
        })
    }
}

/// A passphrase tree's name (1 to 128 bytes) and realm (at most 128 bytes), §5.9.
fn check_passphrase_tree_names(name: &str, realm: &str) -> Result<(), KeyError> {
    check_tree_name(name)?;
    if name.is_empty() {
        return Err(KeyError::InvalidTreeName("a passphrase tree needs a name"));
    }
    if realm.len() > MAX_REALM {
        return Err(KeyError::InvalidTreeName("realm longer than 128 bytes"));
    }
    Ok(())
}

/// A tree admin's key: the root of the current epoch and the admin signing key. It can
/// issue admin-signed grants for any scope and rotate to a new epoch.
#[derive(Clone)]
pub struct TreeKey {
    tree_id: TreeId,
    epoch: u64,
    name: String,
    root: Secret32,
    admin: SigningKey,
    passphrase: bool,
    prev_cutoff_ms: u64,
    not_after_ms: u64,
}

impl fmt::Debug for TreeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeKey")
            .field("name", &self.name)
            .field("tree_id", &self.tree_id)
            .field("epoch", &self.epoch)
            .field("passphrase", &self.passphrase)
            .finish_non_exhaustive()
    }
}

impl TreeKey {
    /// A new tree with a random id, epoch 0, a random root and a random admin key, from
    /// the operating system's randomness (`crypto.getRandomValues` in a browser).
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        Self::generate_with(name, &mut rand_core::OsRng)
    }

    /// [`TreeKey::generate`] from the caller's CSPRNG.
    pub fn generate_with(name: &str, rng: &mut impl CryptoRngCore) -> Result<Self, KeyError> {
        check_tree_name(name)?;
        let tree_id = TreeId::random(rng);
        let mut root = Secret32([0; 32]);
        rng.fill_bytes(&mut root.0);
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut seed[..]);
        Ok(TreeKey {
            tree_id,
            epoch: 0,
            name: name.to_owned(),
            root,
            admin: SigningKey::from_bytes(&seed),
            passphrase: false,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
        })
    }

    /// A tree from a shared name and passphrase (epoch 0 only): see
    /// [`TreeKey::from_passphrase_in_realm`] with the empty realm.
    pub fn from_passphrase(
        name: &str,
        passphrase: &[u8],
        params: PassphraseParams,
    ) -> Result<Self, KeyError> {
        Self::from_passphrase_in_realm(name, "", passphrase, params)
    }

    /// A tree from a shared name, an optional realm (e.g. an application or organisation
    /// name; "" for none) and a passphrase.
    ///
    /// `tree_id = TreeId::from_name_in_realm(realm, name)`, `salt = BLAKE3-derive_key(
    /// "whispeer v1 passphrase salt", tree_id ‖ lp(name) [‖ lp(realm) if realm ≠ ""])`, and
    /// Argon2id(passphrase, salt, params) gives 64 bytes: the epoch-0 root, then the admin
    /// key seed. Every member therefore knows the admin key: the certificate is marked as a
    /// passphrase tree and no epoch after 0 is accepted (rotate by choosing a new
    /// passphrase). Anyone who sees a key id of the tree (the relay, any holder of
    /// ciphertext) can run an offline dictionary attack at the Argon2id cost per guess: use
    /// ~80 bits (six diceware words).
    ///
    /// `params` must be what §5.9 fixes — [`PassphraseParams::SPEC`] (the default) or, to
    /// reproduce a version-1 tree, [`PassphraseParams::V1`] — or the call fails with
    /// [`KeyError::PassphraseParams`] before Argon2 runs ([`PassphraseParams::check`]).
    pub fn from_passphrase_in_realm(
        name: &str,
        realm: &str,
        passphrase: &[u8],
        params: PassphraseParams,
    ) -> Result<Self, KeyError> {
        check_passphrase_tree_names(name, realm)?;
        params.check()?;
        Self::derive_from_passphrase(name, realm, passphrase, params)
    }

    /// [`TreeKey::from_passphrase_in_realm`] at **any** Argon2id parameters, for tests and
    /// known-answer vectors that cannot afford 256 MiB per derivation. Not part of the API:
    /// only built with the `test-passphrase-params` feature (never enable it in a build that
    /// derives real trees), because §5.9 fixes the parameters.
    #[cfg(any(test, feature = "test-passphrase-params"))]
    #[doc(hidden)]
    pub fn from_passphrase_in_realm_any_params(
        name: &str,
        realm: &str,
        passphrase: &[u8],
        params: PassphraseParams,
    ) -> Result<Self, KeyError> {
        check_passphrase_tree_names(name, realm)?;
        Self::derive_from_passphrase(name, realm, passphrase, params)
    }

    /// The §5.9 derivation, once the names and parameters are checked.
    fn derive_from_passphrase(
        name: &str,
        realm: &str,
        passphrase: &[u8],
        params: PassphraseParams,
    ) -> Result<Self, KeyError> {
        let tree_id = TreeId::from_name_in_realm(realm, name);
        let mut salt_in = tree_id.0.to_vec();
        put_lp(&mut salt_in, name.as_bytes());
        if !realm.is_empty() {
            put_lp(&mut salt_in, realm.as_bytes());
        }
        let salt = blake3::derive_key("whispeer v1 passphrase salt", &salt_in);
        let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(64))
            .map_err(|e| KeyError::Passphrase(e.to_string()))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
        let mut out = Zeroizing::new([0u8; 64]);
        a.hash_password_into(passphrase, &salt, &mut out[..])
            .map_err(|e| KeyError::Passphrase(e.to_string()))?;
        let root = Secret32(out[..32].try_into().expect("32 bytes"));
        let seed = Zeroizing::new(<[u8; 32]>::try_from(&out[32..]).expect("32 bytes"));
        Ok(TreeKey {
            tree_id,
            epoch: 0,
            name: name.to_owned(),
            root,
            admin: SigningKey::from_bytes(&seed),
            passphrase: true,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
        })
    }

    /// A tree key from its raw parts (known-answer tests, and restoring from storage): not a
    /// passphrase tree, no cutoff (a later epoch's certificate then refuses every earlier
    /// message: set one with [`TreeKey::with_prev_cutoff`]), no end.
    pub fn from_parts(
        tree_id: TreeId,
        epoch: u64,
        name: &str,
        root: [u8; 32],
        admin_seed: [u8; 32],
    ) -> Result<Self, KeyError> {
        check_tree_name(name)?;
        Ok(TreeKey {
            tree_id,
            epoch,
            name: name.to_owned(),
            root: Secret32(root),
            admin: SigningKey::from_bytes(&admin_seed),
            passphrase: false,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
        })
    }

    /// A new epoch: fresh random root (never derived from the old one, so a removed member
    /// cannot roll forward), same tree id and admin. `cutoff_ms` goes into the new epoch's
    /// certificate: receivers holding it refuse messages of earlier epochs dated at or after
    /// it (from history), and accept earlier-epoch live messages dated before it only during
    /// their grace period. Use the time of the removal (now). Passphrase trees cannot rotate.
    pub fn rotate(
        &self,
        cutoff_ms: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Result<TreeKey, KeyError> {
        if self.passphrase {
            return Err(KeyError::PassphraseEpoch {
                tree: self.tree_id.to_string(),
                epoch: self.epoch.saturating_add(1),
            });
        }
        let epoch = self.epoch.checked_add(1).ok_or(KeyError::InvalidString {
            kind: "tree key",
            reason: "epoch exhausted".into(),
        })?;
        let mut root = Secret32([0; 32]);
        rng.fill_bytes(&mut root.0);
        Ok(TreeKey {
            epoch,
            root,
            prev_cutoff_ms: cutoff_ms,
            not_after_ms: NO_LIMIT,
            ..self.clone()
        })
    }

    /// The same key with another cutoff for earlier epochs (ignored at epoch 0).
    pub fn with_prev_cutoff(mut self, cutoff_ms: u64) -> Self {
        self.prev_cutoff_ms = if self.epoch == 0 { 0 } else { cutoff_ms };
        self
    }

    /// The same key whose certificate refuses messages of this epoch dated after
    /// `not_after_ms` (`None`: no end). Receivers that never get the next epoch stop
    /// accepting this one for new messages after it.
    ///
    /// A passphrase tree cannot end (an error unless `None`): every member knows its admin
    /// key, so an end would be one member's decision imposed on the others, and receivers
    /// refuse such a certificate (§5.9).
    pub fn with_not_after(mut self, not_after_ms: Option<u64>) -> Result<Self, KeyError> {
        let not_after_ms = not_after_ms.unwrap_or(NO_LIMIT);
        if self.passphrase && not_after_ms != NO_LIMIT {
            return Err(passphrase_end_refused("tree key"));
        }
        self.not_after_ms = not_after_ms;
        Ok(self)
    }

    /// The tree id.
    pub fn tree_id(&self) -> TreeId {
        self.tree_id
    }
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The display name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The admin's public key.
    pub fn admin(&self) -> SenderId {
        SenderId(self.admin.verifying_key())
    }
    /// An identity whose signing key is the tree's admin key, to seal invites as the admin
    /// ([`crate::Invite::seal`]): the recipient then sees that the admin itself enrolled it
    /// ([`crate::Invite::inviter_is_admin`], PROTOCOL §10). Its X25519 key is derived from
    /// the admin seed (`derive_key("whispeer v2 tree admin x25519", seed)`); it is a secret
    /// like the tree key.
    pub fn admin_identity(&self) -> Identity {
        let seed = Zeroizing::new(self.admin.to_bytes());
        let x = Zeroizing::new(blake3::derive_key(
            "whispeer v2 tree admin x25519",
            &seed[..],
        ));
        Identity::from_seeds(&seed, &x)
    }
    /// A passphrase tree.
    pub fn is_passphrase(&self) -> bool {
        self.passphrase
    }
    /// The cutoff for earlier epochs in this epoch's certificate.
    pub fn prev_cutoff_ms(&self) -> u64 {
        self.prev_cutoff_ms
    }
    /// The end of this epoch, if set.
    pub fn not_after_ms(&self) -> Option<u64> {
        (self.not_after_ms != NO_LIMIT).then_some(self.not_after_ms)
    }

    fn base(&self) -> Secret32 {
        kh(
            self.root.as_bytes(),
            tag::BASE,
            &[&self.tree_id.0, &self.epoch.to_be_bytes()],
        )
    }

    /// The signed epoch certificate.
    pub fn cert(&self) -> EpochCert {
        let b = self.base();
        let r = kh(b.as_bytes(), tag::ROUTING, &[]);
        let n = kh(b.as_bytes(), tag::NAME, &[]);
        let admin = self.admin.verifying_key();
        let flags = if self.passphrase {
            CERT_FLAG_PASSPHRASE
        } else {
            0
        };
        let f = CertFields {
            tree_id: &self.tree_id,
            epoch: self.epoch,
            flags,
            name: &self.name,
            admin: &admin,
            r: &r,
            n: &n,
            prev_cutoff_ms: self.prev_cutoff_ms,
            not_after_ms: self.not_after_ms,
        };
        let sig = self.admin.sign(&f.sig_input());
        EpochCert {
            keys: EpochKeys::new(self.tree_id, self.epoch, r, n),
            flags,
            tree_name: self.name.clone(),
            admin,
            prev_cutoff_ms: self.prev_cutoff_ms,
            not_after_ms: self.not_after_ms,
            sig,
        }
    }

    fn sign_grant(&self, cert: EpochCert, scope: Scope, key: Secret32) -> Grant {
        let sig = self.admin.sign(&grant_sig_input(
            GRANT_CONTEXT,
            &cert.keys,
            &scope,
            &key,
            None,
        ));
        Grant {
            cert,
            scope,
            key,
            auth: GrantAuth::Admin(sig),
        }
    }

    /// The admin-signed grant for the whole tree.
    pub fn grant_all(&self) -> Grant {
        self.sign_grant(self.cert(), Scope::Tree, subtree_root(&self.base()))
    }

    /// The admin-signed grant for `scope`.
    pub fn grant(&self, scope: &Scope) -> Grant {
        let all = self.grant_all();
        let key = all.key_for(scope).expect("the tree covers every scope");
        self.sign_grant(all.cert, scope.clone(), key)
    }

    /// The admin key string (`wstree1…`, format 2): whoever holds it controls the tree.
    pub fn to_key_string(&self) -> Zeroizing<String> {
        let mut b = Zeroizing::new(Vec::with_capacity(160));
        b.push(KEY_FORMAT);
        b.push(if self.passphrase {
            CERT_FLAG_PASSPHRASE
        } else {
            0
        });
        b.extend_from_slice(&self.tree_id.0);
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.extend_from_slice(self.root.as_bytes());
        b.extend_from_slice(self.admin.as_bytes());
        put_lp(&mut b, self.name.as_bytes());
        b.extend_from_slice(&self.prev_cutoff_ms.to_be_bytes());
        b.extend_from_slice(&self.not_after_ms.to_be_bytes());
        Zeroizing::new(text::encode(hrp::TREE, &b))
    }

    /// Parses an admin key string (format 2; format 1 gives [`KeyError::OldVersion`]).
    pub fn from_key_string(s: &str) -> Result<Self, KeyError> {
        let b = Zeroizing::new(text::decode(hrp::TREE, s)?);
        let mut c = Cursor::new(&b, "tree key");
        let v = c.u8()?;
        if v == FORMAT_V1 {
            return Err(KeyError::OldVersion {
                kind: "tree key",
                version: v,
            });
        }
        if v != KEY_FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "tree key",
                version: v,
            });
        }
        let flags = c.u8()?;
        if flags & !CERT_FLAG_PASSPHRASE != 0 {
            return Err(KeyError::InvalidString {
                kind: "tree key",
                reason: format!("unknown flags 0x{flags:02x}"),
            });
        }
        let tree_id = TreeId(c.arr()?);
        let epoch = c.u64()?;
        let root = Secret32(c.arr()?);
        let seed = Zeroizing::new(c.arr::<32>()?);
        let name = c.lp_str()?;
        check_tree_name(&name)?;
        let prev_cutoff_ms = c.u64()?;
        let not_after_ms = c.u64()?;
        c.finish()?;
        let passphrase = flags & CERT_FLAG_PASSPHRASE != 0;
        if passphrase && epoch > 0 {
            return Err(KeyError::PassphraseEpoch {
                tree: tree_id.to_string(),
                epoch,
            });
        }
        // Its certificate would be refused by every receiver.
        if passphrase && not_after_ms != NO_LIMIT {
            return Err(passphrase_end_refused("tree key"));
        }
        Ok(TreeKey {
            tree_id,
            epoch,
            name,
            root,
            admin: SigningKey::from_bytes(&seed),
            passphrase,
            prev_cutoff_ms: if epoch == 0 { 0 } else { prev_cutoff_ms },
            not_after_ms,
        })
    }

    /// Parses a format-1 admin key string (for `whispeer key upgrade`). A tree whose id is
    /// `TreeId::from_name(name)` is taken to be a passphrase tree; a later epoch gets the
    /// cutoff 0 (version-1 messages cannot be opened by version 2 anyway).
    fn from_v1_bytes(b: &[u8]) -> Result<Self, KeyError> {
        let mut c = Cursor::new(b, "tree key");
        let _v = c.u8()?;
        let tree_id = TreeId(c.arr()?);
        let epoch = c.u64()?;
        let root = Secret32(c.arr()?);
        let seed = Zeroizing::new(c.arr::<32>()?);
        let name = c.lp_str()?;
        check_tree_name(&name)?;
        c.finish()?;
        let passphrase = !name.is_empty() && TreeId::from_name(&name) == tree_id;
        if passphrase && epoch > 0 {
            return Err(KeyError::PassphraseEpoch {
                tree: tree_id.to_string(),
                epoch,
            });
        }
        Ok(TreeKey {
            tree_id,
            epoch,
            name,
            root,
            admin: SigningKey::from_bytes(&seed),
            passphrase,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
        })
    }
}

impl FromStr for TreeKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        TreeKey::from_key_string(s)
    }
}

/// What `whispeer key upgrade` did with a key string.
#[derive(Debug)]
#[non_exhaustive]
pub enum Upgraded {
    /// A format-1 tree key, converted fully.
    Tree(Box<TreeKey>),
    /// Already the current format (returned unchanged).
    Current(Zeroizing<String>),
}

/// Converts a key string to the current format. A version-1 `wstree` converts fully. A
/// version-1 `wskey` grant carries no admin signature and cannot be converted: it gives
/// [`KeyError::NeedsReissue`] (ask the admin to run `whispeer key derive` with the tree key,
/// or to send an invite). A current string is returned unchanged.
pub fn upgrade_key_string(s: &str) -> Result<Upgraded, KeyError> {
    let lower = Zeroizing::new(s.trim().to_ascii_lowercase());
    if lower.starts_with("wstree1") {
        let b = Zeroizing::new(text::decode(hrp::TREE, s)?);
        return match b.first() {
            Some(&FORMAT_V1) => Ok(Upgraded::Tree(Box::new(TreeKey::from_v1_bytes(&b)?))),
            _ => {
                TreeKey::from_key_string(s)?;
                Ok(Upgraded::Current(Zeroizing::new(s.trim().to_owned())))
            }
        };
    }
    if lower.starts_with("wskey1") {
        let b = Zeroizing::new(text::decode(hrp::GRANT, s)?);
        return match b.first() {
            Some(&FORMAT_V1) => Err(KeyError::NeedsReissue(
                "a version-1 grant (wskey) carries no admin signature and cannot be upgraded: \
                 ask the tree admin for a new one (`whispeer key derive` with the tree key, or \
                 an invite), or upgrade the tree key (wstree) if you hold it",
            )),
            _ => {
                Grant::from_key_string(s)?;
                Ok(Upgraded::Current(Zeroizing::new(s.trim().to_owned())))
            }
        };
    }
    // The kind is named only when what precedes the first '1' looks like a key string's
    // type prefix (`ws` and a few letters, as all of ours): of anything else (a relay account secret `wsp_acct_sk_<hex>`, a bearer
    // token) it is the secret itself, which the error — printed, logged — must not carry.
    let prefix = lower.split_once('1').map(|(h, _)| h).filter(|h| {
        h.starts_with("ws") && h.len() <= 10 && h.bytes().all(|b| b.is_ascii_lowercase())
    });
    Err(match prefix {
        Some(h) => KeyError::WrongKind {
            expected: "wstree or wskey",
            found: h.to_owned(),
        },
        None => KeyError::InvalidString {
            kind: "wstree or wskey",
            reason: "not a key string".to_owned(),
        },
    })
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    /// A grant for `scope` holding `key` (any bytes), narrowed from `parent` and signed by
    /// `by`: what a malicious member can hand out.
    pub(crate) fn forge_narrowed(
        real: &Grant,
        parent: Scope,
        scope: Scope,
        key: [u8; 32],
        by: &Identity,
    ) -> Grant {
        let key = Secret32(key);
        let sig = by.sign(&grant_sig_input(
            NARROW_CONTEXT,
            &real.cert.keys,
            &scope,
            &key,
            Some(&parent),
        ));
        let g = Grant {
            cert: real.cert.clone(),
            scope,
            key,
            auth: GrantAuth::Narrowed {
                parent,
                by: by.signing_key().verifying_key(),
                sig,
            },
        };
        // It survives its own encoding: the signature is valid, only the key is a lie.
        Grant::from_bytes(&g.to_bytes()).expect("a well-signed forgery parses")
    }
    /// An admin-signed whole-tree grant of `attacker`'s tree whose certificate copies the
    /// victim's R and N (under `tree_id`).
    pub(crate) fn copy_rn(victim: &TreeKey, attacker: &TreeKey, tree_id: TreeId) -> Grant {
        let vc = victim.cert();
        let admin = attacker.admin.verifying_key();
        let f = CertFields {
            tree_id: &tree_id,
            epoch: vc.keys.epoch,
            flags: 0,
            name: &vc.tree_name,
            admin: &admin,
            r: &vc.keys.routing,
            n: &vc.keys.name,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
        };
        let sig = attacker.admin.sign(&f.sig_input());
        let cert = EpochCert {
            keys: EpochKeys::new(
                tree_id,
                vc.keys.epoch,
                vc.keys.routing.clone(),
                vc.keys.name.clone(),
            ),
            flags: 0,
            tree_name: vc.tree_name.clone(),
            admin,
            prev_cutoff_ms: 0,
            not_after_ms: NO_LIMIT,
            sig,
        };
        let other = with_tree_id(attacker, tree_id);
        other.sign_grant(cert, Scope::Tree, subtree_root(&other.base()))
    }
    /// The same grant claiming another key id (to test the keyring's key-id check alone).
    pub(crate) fn with_forced_key_id(g: &Grant, id: KeyId) -> Grant {
        let mut g = g.clone();
        g.cert.keys = g.cert.keys.clone().with_key_id_for_tests(id);
        g
    }
    /// The same key without the passphrase flag.
    pub(crate) fn unflag(tk: &TreeKey) -> TreeKey {
        TreeKey {
            passphrase: false,
            ..tk.clone()
        }
    }
    /// A passphrase-flagged tree key at any epoch (what a member knowing the passphrase
    /// could sign).
    pub(crate) fn passphrase_at(tk: &TreeKey, epoch: u64) -> TreeKey {
        TreeKey {
            epoch,
            passphrase: true,
            ..tk.clone()
        }
    }
    /// The same key whose certificate ends at `not_after_ms`, whatever the key is: what a
    /// passphrase-tree member could sign, since she knows the admin key.
    pub(crate) fn ending_at(tk: &TreeKey, not_after_ms: u64) -> TreeKey {
        TreeKey {
            not_after_ms,
            ..tk.clone()
        }
    }
    /// The same key material under another tree id (to forge a grant in tests).
    pub(crate) fn with_tree_id(tk: &TreeKey, id: TreeId) -> TreeKey {
        TreeKey {
            tree_id: id,
            ..tk.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(7)
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    /// PROTOCOL §5.7: an ordinary tree's name may be empty (the tree id identifies it) and
    /// survives its key strings; a passphrase tree's may not (its id and salt come from it).
    #[test]
    fn only_a_passphrase_tree_needs_a_name() {
        let tk = TreeKey::generate_with("", &mut rng()).unwrap();
        assert_eq!(
            TreeKey::from_key_string(&tk.to_key_string())
                .unwrap()
                .name(),
            ""
        );
        let g = Grant::from_key_string(&tk.grant_all().to_key_string()).unwrap();
        assert_eq!(g.cert().tree_name(), "");
        let fast = PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        assert!(matches!(
            TreeKey::from_passphrase("", b"pw", fast),
            Err(KeyError::InvalidTreeName(_))
        ));
        assert!(TreeKey::generate_with(&"x".repeat(129), &mut rng()).is_err());
    }

    #[test]
    fn subtree_grant_derives_children_not_siblings() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        let all = tk.grant_all();
        let kitchen = tk.grant(&Scope::Subtree(t("sensor/kitchen")));
        let me = Identity::generate_with(&mut rng());
        let temp = t("sensor/kitchen/temp");
        assert_eq!(kitchen.message_key(&temp), all.message_key(&temp));
        assert_eq!(
            kitchen.message_key(&t("sensor/kitchen")),
            all.message_key(&t("sensor/kitchen"))
        );
        assert_eq!(kitchen.message_key(&t("sensor/garage/temp")), None);
        assert!(kitchen.narrow(&t("sensor"), false, &me).is_err());
        let one = kitchen.narrow(&temp, true, &me).unwrap();
        assert_eq!(one.message_key(&temp), all.message_key(&temp));
        assert_eq!(one.message_key(&t("sensor/kitchen/temp/x")), None);
        assert!(one.narrow(&t("sensor/kitchen/temp/x"), false, &me).is_err());
        // a/bc and ab/c are different keys (length prefix).
        assert_ne!(all.message_key(&t("a/bc")), all.message_key(&t("ab/c")));
    }

    #[test]
    fn key_strings_roundtrip_and_verify() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        let s = tk.to_key_string();
        assert!(s.starts_with("wstree1"));
        let back = TreeKey::from_key_string(&s).unwrap();
        assert_eq!(
            back.grant_all().message_key(&t("a")),
            tk.grant_all().message_key(&t("a"))
        );
        let g = tk.grant(&Scope::Subtree(t("sensor")));
        let gs = g.to_key_string();
        assert!(gs.starts_with("wskey1"));
        let g2 = Grant::from_key_string(&gs).unwrap();
        assert_eq!(g2.scope(), g.scope());
        assert_eq!(g2.epoch_keys().key_id(), g.epoch_keys().key_id());
        // A forged certificate (other R) fails its signature.
        let mut raw = g.to_bytes().to_vec();
        let r_off = 1 + 16 + 8 + 1 + 2 + 4 + 32;
        raw[r_off] ^= 1;
        assert_eq!(
            Grant::from_bytes(&raw).unwrap_err(),
            KeyError::BadSignature("epoch certificate")
        );
    }

    #[test]
    fn rotation_changes_everything_but_tree_and_admin() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        let next = tk.rotate(5, &mut rng()).unwrap();
        assert_eq!(next.epoch(), 1);
        assert_eq!(next.tree_id(), tk.tree_id());
        assert_eq!(next.admin(), tk.admin());
        assert_ne!(next.cert().keys().key_id(), tk.cert().keys().key_id());
    }

    /// Review finding: `from_passphrase` ran Argon2id at whatever parameters it was given
    /// (m = 8 KiB, t = 1: cheap offline guessing for anyone with a key id; huge ones: a
    /// crafted-parameter DoS). PROTOCOL §5.9 fixes them: the spec's and version 1's only.
    #[test]
    fn passphrase_trees_take_only_the_spec_parameters() {
        let pp = |m_kib, t, p| PassphraseParams { m_kib, t, p };
        assert_eq!(PassphraseParams::default(), pp(262144, 2, 1));
        assert_eq!(PassphraseParams::SPEC, pp(262144, 2, 1));
        assert_eq!(PassphraseParams::V1, pp(65536, 3, 1));
        assert!(PassphraseParams::SPEC.check().is_ok());
        assert!(PassphraseParams::V1.check().is_ok());
        let refused = [
            pp(8, 1, 1),
            pp(64, 1, 1),
            pp(1024, 1, 1),
            pp(0, 0, 0),
            pp(262144, 1, 1),
            pp(262144, 2, 2),
            pp(262144, 2, 0),
            pp(262144, 3, 1),
            pp(65536, 2, 1),
            pp(65536, 3, 2),
            pp(524288, 2, 1),
            pp(4 * 1024 * 1024, 2, 1),
            pp(u32::MAX, 2, 1),
            pp(262144, u32::MAX, 1),
            pp(u32::MAX, u32::MAX, u32::MAX),
        ];
        for bad in refused {
            let want = KeyError::PassphraseParams {
                m_kib: bad.m_kib,
                t: bad.t,
                p: bad.p,
            };
            assert_eq!(bad.check(), Err(want.clone()), "{bad:?}");
            // Refused before Argon2 runs (u32::MAX KiB would abort on allocation).
            assert_eq!(
                TreeKey::from_passphrase("family", b"pw", bad).unwrap_err(),
                want
            );
            assert_eq!(
                TreeKey::from_passphrase_in_realm("family", "acme", b"pw", bad).unwrap_err(),
                want
            );
            let e = want.to_string();
            assert!(e.contains("§5.9") && e.contains("262144"), "{e}");
        }
        // The names are checked first, as before.
        assert!(matches!(
            TreeKey::from_passphrase("", b"pw", pp(8, 1, 1)),
            Err(KeyError::InvalidTreeName(_))
        ));
    }

    /// The spec's parameters derive the §5.9 example (256 MiB: one derivation).
    #[test]
    fn the_spec_parameters_derive_the_spec_example() {
        let tk = TreeKey::from_passphrase(
            "family",
            b"correct horse battery staple",
            PassphraseParams::default(),
        )
        .unwrap();
        assert_eq!(tk.tree_id().to_string(), "8385eb53bfc26f3483c996783d3bdb45");
        assert_eq!(
            hex::encode(tk.cert().keys().key_id().as_bytes()),
            "0857208cafba5520218467e1730de083"
        );
    }

    #[test]
    fn passphrase_trees_agree() {
        let fast = PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let a = TreeKey::from_passphrase_in_realm_any_params(
            "family",
            "",
            b"correct horse battery staple",
            fast,
        )
        .unwrap();
        let b = TreeKey::from_passphrase_in_realm_any_params(
            "family",
            "",
            b"correct horse battery staple",
            fast,
        )
        .unwrap();
        let c = TreeKey::from_passphrase_in_realm_any_params("family", "", b"wrong", fast).unwrap();
        assert_eq!(a.cert().keys().key_id(), b.cert().keys().key_id());
        assert_ne!(a.cert().keys().key_id(), c.cert().keys().key_id());
        assert_eq!(a.tree_id(), TreeId::from_name("family"));
    }

    #[test]
    fn tokens_are_position_bound() {
        let k = TreeKey::generate_with("x", &mut rng())
            .unwrap()
            .cert()
            .keys()
            .clone();
        assert_ne!(k.token(0, "a"), k.token(1, "a"));
        let p = k.token_path(&t("a/b/c"));
        assert_eq!(p.tokens()[1], k.token(1, "b"));
        let f = k.compile(&TopicFilter::new("a/+/c").unwrap());
        assert!(f.matches(&p));
        assert!(!k.compile(&TopicFilter::new("b/#").unwrap()).matches(&p));
    }

    #[test]
    fn narrowed_grants_record_the_narrower_and_verify() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        let bob = Identity::generate_with(&mut rng());
        let g = tk.grant(&Scope::Subtree(t("sensor")));
        assert_eq!(g.claimed_provenance(), Provenance::AdminSigned);
        let n = g.narrow(&t("sensor/kitchen"), false, &bob).unwrap();
        assert_eq!(
            n.claimed_provenance(),
            Provenance::Delegated {
                by: bob.sender_id()
            }
        );
        assert_eq!(n.narrowed_from(), Some(&Scope::Subtree(t("sensor"))));
        let back = Grant::from_key_string(&n.to_key_string()).unwrap();
        assert_eq!(back.scope(), n.scope());
        assert_eq!(back.key_commitment(), n.key_commitment());
        // Any changed byte of the admin's signature, the key or the scope is refused.
        let raw = g.to_bytes().to_vec();
        let mut bad = raw.clone();
        *bad.last_mut().unwrap() ^= 1; // admin signature
        assert_eq!(
            Grant::from_bytes(&bad).unwrap_err(),
            KeyError::BadSignature("grant (admin)")
        );
        let mut bad = raw.clone();
        let key_off = raw.len() - 64 - 1 - 32;
        bad[key_off] ^= 1; // the key itself
        assert_eq!(
            Grant::from_bytes(&bad).unwrap_err(),
            KeyError::BadSignature("grant (admin)")
        );
        let raw = n.to_bytes().to_vec();
        let mut bad = raw.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            Grant::from_bytes(&bad).unwrap_err(),
            KeyError::BadSignature("grant (narrower)")
        );
    }

    /// Review of the CLI: `key upgrade` of a file holding another secret (a relay account
    /// key `wsp_acct_sk_<hex>` from `auth-keygen`, a token) said what it "found": everything
    /// before the first '1' — most of the secret, all of it without a '1'. Now only a
    /// key string's type prefix is named.
    #[test]
    fn upgrading_something_else_names_its_kind_but_never_echoes_a_secret() {
        let secret = format!("wsp_acct_sk_{}", "ab".repeat(32));
        let e = upgrade_key_string(&secret).unwrap_err();
        assert!(!e.to_string().contains("abab"), "{e}");
        assert!(e.to_string().contains("not a key string"), "{e}");
        let e = upgrade_key_string(&format!("{}1{}", "ab".repeat(8), "cd".repeat(8))).unwrap_err();
        assert!(!e.to_string().contains("abab"), "{e}");
        let id = text::encode(hrp::PUBLIC_ID, &[0u8; 8]);
        assert!(matches!(
            upgrade_key_string(&id),
            Err(KeyError::WrongKind { found, .. }) if found == hrp::PUBLIC_ID
        ));
    }

    #[test]
    fn version_1_strings_are_refused_and_upgraded() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        // The version-1 layout: 0x01 ‖ tree_id ‖ epoch ‖ root ‖ seed ‖ lp(name).
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&tk.tree_id.0);
        v1.extend_from_slice(&3u64.to_be_bytes());
        v1.extend_from_slice(tk.root.as_bytes());
        v1.extend_from_slice(tk.admin.as_bytes());
        put_lp(&mut v1, b"home");
        let s = text::encode(hrp::TREE, &v1);
        assert_eq!(
            TreeKey::from_key_string(&s).unwrap_err(),
            KeyError::OldVersion {
                kind: "tree key",
                version: 1
            }
        );
        let Upgraded::Tree(up) = upgrade_key_string(&s).unwrap() else {
            panic!("a v1 tree key converts")
        };
        assert_eq!(up.epoch(), 3);
        assert_eq!(up.admin(), tk.admin());
        assert_eq!(up.prev_cutoff_ms(), 0);
        assert!(!up.is_passphrase());
        let again = TreeKey::from_key_string(&up.to_key_string()).unwrap();
        assert_eq!(again.cert().keys(), up.cert().keys());
        assert!(matches!(
            upgrade_key_string(&up.to_key_string()).unwrap(),
            Upgraded::Current(_)
        ));
        // A v1 grant cannot become admin-signed.
        let g1 = text::encode(hrp::GRANT, &[1u8, 0, 0]);
        assert!(matches!(
            Grant::from_key_string(&g1),
            Err(KeyError::OldVersion { .. })
        ));
        assert!(matches!(
            upgrade_key_string(&g1),
            Err(KeyError::NeedsReissue(_))
        ));
        // A v1 passphrase tree keeps its tree id and is marked.
        let fast = PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let pt = TreeKey::from_passphrase_in_realm_any_params("family", "", b"pw", fast).unwrap();
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&pt.tree_id.0);
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(pt.root.as_bytes());
        v1.extend_from_slice(pt.admin.as_bytes());
        put_lp(&mut v1, b"family");
        let Upgraded::Tree(up) = upgrade_key_string(&text::encode(hrp::TREE, &v1)).unwrap() else {
            panic!()
        };
        assert!(up.is_passphrase());
        assert_eq!(up.cert().keys(), pt.cert().keys());
    }

    #[test]
    fn key_id_binds_tree_and_epoch() {
        let tk = TreeKey::generate_with("home", &mut rng()).unwrap();
        let other = tests_support::with_tree_id(&tk, TreeId([9; 16]));
        // Same root, other tree id: other R too (B binds the tree id), and other key id.
        assert_ne!(tk.cert().keys().key_id(), other.cert().keys().key_id());
        let k = tk.cert().keys().clone();
        let mut id = [0u8; 16];
        xof(
            k.routing.as_bytes(),
            tag::KEY_ID,
            &[&k.tree_id.0, &k.epoch.to_be_bytes()],
            &mut id,
        );
        assert_eq!(k.key_id().as_bytes(), &id);
    }

    /// PROTOCOL §5.10 "The tree's admin identity", pinned: for admin seed 0x00 0x01 … 0x1f,
    /// the Ed25519 key is the admin key (the certificate's `admin_pk`) and the X25519
    /// scalar is `BLAKE3-derive_key("whispeer v2 tree admin x25519", admin seed)`. The
    /// public keys are fixed bytes (the X25519 and Ed25519 public keys cross-checked with
    /// Python `cryptography` from the scalar and the seed), so a change of the context
    /// string or the input breaks this test; the derivation is recomputed from the spec
    /// alone beside them.
    #[test]
    fn admin_identity_known_answer() {
        let seed: [u8; 32] = core::array::from_fn(|i| i as u8);
        let tk = TreeKey::from_parts(TreeId([7; 16]), 0, "home", [9; 32], seed).unwrap();
        let id = tk.admin_identity();
        let public = id.public_id();
        // The spec, independently: Ed25519 from the seed; X25519 from the derived scalar.
        let ed = SigningKey::from_bytes(&seed).verifying_key();
        let x = blake3::derive_key("whispeer v2 tree admin x25519", &seed);
        let x_pk = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(x));
        assert_eq!(
            hex::encode(x),
            "e2661b3b693e46e2331e91a69b7d97f233ca23e541d0836725b2e5cbce282a6f"
        );
        assert_eq!(
            hex::encode(x_pk.as_bytes()),
            "326b6e6304fc9f625e7e627c52a80bc6f60c8fccbb8cd3676d2499060e00aa7f"
        );
        assert_eq!(
            hex::encode(public.x25519()),
            "326b6e6304fc9f625e7e627c52a80bc6f60c8fccbb8cd3676d2499060e00aa7f"
        );
        assert_eq!(
            hex::encode(ed.as_bytes()),
            "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        assert_eq!(id.sender_id(), tk.admin());
        assert_eq!(public.sender_id(), tk.cert().admin());
        // Every epoch of the tree has the same admin identity (the admin key does not rotate).
        let next = tk.rotate(1, &mut rng()).unwrap();
        assert_eq!(next.admin_identity().public_id(), public);
    }
}
