//! Topic trees: a random tree id, an epoch, a fresh root per epoch, and everything derived
//! from it (DESIGN §4, CRYPTO.md "Tree keys").
//!
//! ```text
//! B     = kh(root_e, 0x01 ‖ tree_id ‖ u64be(epoch))
//! R     = kh(B, 0x02)            routing key: tokens and key id
//! N     = kh(B, 0x03)            name key: sealed topic names
//! S("") = kh(B, 0x04)            whole-tree subtree key
//! S(p/s)= kh(S(p), 0x05 ‖ lp(s)) subtree key — a grant for p/s/# is S(p/s)
//! M(t)  = kh(S(t), 0x06)         message key of exactly topic t — a grant for t alone
//! ```
//! The admin signs an *epoch certificate* `(tree_id, epoch, name, admin, R, N)`; every grant
//! carries it, so a holder can pass a narrower grant on (deriving deeper keys needs no
//! admin) and receivers still know the tree and epoch are the admin's.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::error_keys::KeyError;
use crate::identity::SenderId;
use crate::kdf::{kh, lp, tag, xof, Secret32};
use crate::limits::TOKEN_LEN;
use crate::text::{self, hrp, put_lp, Cursor};
use crate::token::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};
use crate::topic::{FilterLevel, Topic, TopicFilter};

const FORMAT: u8 = 1;
const CERT_CONTEXT: &[u8] = b"whispeer/v1/epoch-cert\0";
/// Longest tree name (a label for people; the tree id is what identifies a tree).
pub const MAX_TREE_NAME: usize = 128;

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

impl EpochKeys {
    fn new(tree_id: TreeId, epoch: u64, routing: Secret32, name: Secret32) -> Self {
        let mut id = [0u8; TOKEN_LEN];
        xof(routing.as_bytes(), tag::KEY_ID, &[], &mut id);
        Self {
            tree_id,
            epoch,
            routing,
            name,
            key_id: KeyId::from_bytes(id),
        }
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

/// The admin-signed statement "tree `tree_id` at `epoch` has routing key R and name key N".
#[derive(Clone)]
pub struct EpochCert {
    keys: EpochKeys,
    tree_name: String,
    admin: VerifyingKey,
    sig: Signature,
}

impl fmt::Debug for EpochCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochCert")
            .field("tree_name", &self.tree_name)
            .field("keys", &self.keys)
            .field("admin", &SenderId(self.admin))
            .finish()
    }
}

fn cert_sig_input(
    tree_id: &TreeId,
    epoch: u64,
    name: &str,
    admin: &VerifyingKey,
    r: &Secret32,
    n: &Secret32,
) -> Zeroizing<Vec<u8>> {
    let mut m = Zeroizing::new(CERT_CONTEXT.to_vec());
    m.extend_from_slice(&tree_id.0);
    m.extend_from_slice(&epoch.to_be_bytes());
    put_lp(&mut m, name.as_bytes());
    m.extend_from_slice(admin.as_bytes());
    m.extend_from_slice(r.as_bytes());
    m.extend_from_slice(n.as_bytes());
    m
}

impl EpochCert {
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
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.keys.tree_id.0);
        out.extend_from_slice(&self.keys.epoch.to_be_bytes());
        put_lp(out, self.tree_name.as_bytes());
        out.extend_from_slice(self.admin.as_bytes());
        out.extend_from_slice(self.keys.routing.as_bytes());
        out.extend_from_slice(self.keys.name.as_bytes());
        out.extend_from_slice(&self.sig.to_bytes());
    }
    fn read(c: &mut Cursor<'_>) -> Result<Self, KeyError> {
        let tree_id = TreeId(c.arr()?);
        let epoch = c.u64()?;
        let tree_name = c.lp_str()?;
        check_tree_name(&tree_name)?;
        let admin = VerifyingKey::from_bytes(&c.arr()?)
            .map_err(|_| KeyError::InvalidPublicKey("epoch certificate"))?;
        let r = Secret32(c.arr()?);
        let n = Secret32(c.arr()?);
        let sig = Signature::from_bytes(&c.arr()?);
        admin
            .verify_strict(
                &cert_sig_input(&tree_id, epoch, &tree_name, &admin, &r, &n),
                &sig,
            )
            .map_err(|_| KeyError::BadSignature("epoch certificate"))?;
        Ok(EpochCert {
            keys: EpochKeys::new(tree_id, epoch, r, n),
            tree_name,
            admin,
            sig,
        })
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

/// A key for part of a tree, with the signed epoch certificate. Holders may derive narrower
/// grants ([`Grant::narrow`]) and hand them on; nobody can derive a sibling or a parent.
#[derive(Clone)]
pub struct Grant {
    cert: EpochCert,
    scope: Scope,
    key: Secret32,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("scope", &self.scope)
            .field("cert", &self.cert)
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
    /// What this grant covers.
    pub fn scope(&self) -> &Scope {
        &self.scope
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
    fn descend<'a>(start: &Secret32, segs: impl Iterator<Item = &'a str>) -> Secret32 {
        let mut k = start.clone();
        for s in segs {
            k = subtree_child(&k, s);
        }
        k
    }
    /// A narrower grant: `sub` must lie within this grant's scope. `exact` asks for a
    /// single-topic grant (`M(sub)`) rather than a subtree (`S(sub)`).
    pub fn narrow(&self, sub: &Topic, exact: bool) -> Result<Grant, KeyError> {
        let out_of_scope = || KeyError::OutOfScope {
            scope: self.scope.to_string(),
            target: sub.to_string(),
        };
        let (s_key, skip) = match &self.scope {
            Scope::Tree => (&self.key, 0),
            Scope::Subtree(p) if sub.is_under(p) => (&self.key, p.levels()),
            Scope::Topic(t) if exact && t == sub => return Ok(self.clone()),
            _ => return Err(out_of_scope()),
        };
        let s = Self::descend(s_key, sub.segments().skip(skip));
        let (scope, key) = if exact {
            (Scope::Topic(sub.clone()), message_key(&s))
        } else {
            (Scope::Subtree(sub.clone()), s)
        };
        Ok(Grant {
            cert: self.cert.clone(),
            scope,
            key,
        })
    }

    /// Binary form (inside key strings and invites).
    pub(crate) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(256));
        b.push(FORMAT);
        self.cert.write(&mut b);
        let (kind, path) = match &self.scope {
            Scope::Tree => (0u8, ""),
            Scope::Subtree(p) => (1, p.as_str()),
            Scope::Topic(t) => (2, t.as_str()),
        };
        b.push(kind);
        put_lp(&mut b, path.as_bytes());
        b.extend_from_slice(self.key.as_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Result<Grant, KeyError> {
        let mut c = Cursor::new(b, "grant");
        let v = c.u8()?;
        if v != FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "grant",
                version: v,
            });
        }
        let cert = EpochCert::read(&mut c)?;
        let kind = c.u8()?;
        let path = c.lp_str()?;
        let scope = match kind {
            0 if path.is_empty() => Scope::Tree,
            1 => Scope::Subtree(Topic::new(path)?),
            2 => Scope::Topic(Topic::new(path)?),
            0 => {
                return Err(KeyError::InvalidString {
                    kind: "grant",
                    reason: "a whole-tree scope has no path".into(),
                })
            }
            _ => {
                return Err(KeyError::InvalidString {
                    kind: "grant",
                    reason: "unknown scope kind".into(),
                })
            }
        };
        let key = Secret32(c.arr()?);
        c.finish()?;
        Ok(Grant { cert, scope, key })
    }

    /// The key string (`wskey1…`). Anyone holding it can read and write its scope.
    pub fn to_key_string(&self) -> Zeroizing<String> {
        Zeroizing::new(text::encode(hrp::GRANT, &self.to_bytes()))
    }

    /// Parses a key string and verifies the epoch certificate's signature.
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

/// Argon2id parameters for passphrase trees (written in the spec; both sides must agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassphraseParams {
    /// Memory in KiB (default 65536 = 64 MiB).
    pub m_kib: u32,
    /// Iterations (default 3).
    pub t: u32,
    /// Lanes (default 1: WebAssembly is single-threaded).
    pub p: u32,
}

impl Default for PassphraseParams {
    fn default() -> Self {
        PassphraseParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

/// A tree admin's key: the root of the current epoch and the admin signing key. It can
/// issue grants for any scope and rotate to a new epoch.
#[derive(Clone)]
pub struct TreeKey {
    tree_id: TreeId,
    epoch: u64,
    name: String,
    root: Secret32,
    admin: SigningKey,
}

impl fmt::Debug for TreeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeKey")
            .field("name", &self.name)
            .field("tree_id", &self.tree_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl TreeKey {
    /// A new tree with a random id, epoch 0, a random root and a random admin key.
    pub fn generate(name: &str, rng: &mut impl CryptoRngCore) -> Result<Self, KeyError> {
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
        })
    }

    /// A tree from a shared name and passphrase (epoch 0 only).
    ///
    /// `tree_id = TreeId::from_name(name)`, `salt = BLAKE3-derive_key("whispeer v1
    /// passphrase salt", tree_id ‖ lp(name))`, and Argon2id(passphrase, salt, params) gives
    /// 64 bytes: the epoch-0 root, then the admin key seed. Anyone holding ciphertext can
    /// run an offline dictionary attack: use ~80 bits (six diceware words).
    pub fn from_passphrase(
        name: &str,
        passphrase: &[u8],
        params: PassphraseParams,
    ) -> Result<Self, KeyError> {
        check_tree_name(name)?;
        if name.is_empty() {
            return Err(KeyError::InvalidTreeName("a passphrase tree needs a name"));
        }
        let tree_id = TreeId::from_name(name);
        let mut salt_in = tree_id.0.to_vec();
        put_lp(&mut salt_in, name.as_bytes());
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
        })
    }

    /// A tree key from its raw parts (known-answer tests, and restoring from storage).
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
        })
    }

    /// A new epoch: fresh random root (never derived from the old one, so a removed member
    /// cannot roll forward), same tree id and admin.
    pub fn rotate(&self, rng: &mut impl CryptoRngCore) -> TreeKey {
        let mut root = Secret32([0; 32]);
        rng.fill_bytes(&mut root.0);
        TreeKey {
            epoch: self.epoch + 1,
            root,
            ..self.clone()
        }
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
        let sig = self.admin.sign(&cert_sig_input(
            &self.tree_id,
            self.epoch,
            &self.name,
            &admin,
            &r,
            &n,
        ));
        EpochCert {
            keys: EpochKeys::new(self.tree_id, self.epoch, r, n),
            tree_name: self.name.clone(),
            admin,
            sig,
        }
    }

    /// A grant for the whole tree.
    pub fn grant_all(&self) -> Grant {
        Grant {
            cert: self.cert(),
            scope: Scope::Tree,
            key: subtree_root(&self.base()),
        }
    }

    /// A grant for `scope`.
    pub fn grant(&self, scope: &Scope) -> Grant {
        let all = self.grant_all();
        match scope {
            Scope::Tree => all,
            Scope::Subtree(p) => all.narrow(p, false).expect("the tree covers every subtree"),
            Scope::Topic(t) => all.narrow(t, true).expect("the tree covers every topic"),
        }
    }

    /// The admin key string (`wstree1…`): whoever holds it controls the tree.
    pub fn to_key_string(&self) -> Zeroizing<String> {
        let mut b = Zeroizing::new(Vec::with_capacity(128));
        b.push(FORMAT);
        b.extend_from_slice(&self.tree_id.0);
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.extend_from_slice(self.root.as_bytes());
        b.extend_from_slice(self.admin.as_bytes());
        put_lp(&mut b, self.name.as_bytes());
        Zeroizing::new(text::encode(hrp::TREE, &b))
    }

    /// Parses an admin key string.
    pub fn from_key_string(s: &str) -> Result<Self, KeyError> {
        let b = Zeroizing::new(text::decode(hrp::TREE, s)?);
        let mut c = Cursor::new(&b, "tree key");
        let v = c.u8()?;
        if v != FORMAT {
            return Err(KeyError::UnsupportedVersion {
                kind: "tree key",
                version: v,
            });
        }
        let tree_id = TreeId(c.arr()?);
        let epoch = c.u64()?;
        let root = Secret32(c.arr()?);
        let seed = Zeroizing::new(c.arr::<32>()?);
        let name = c.lp_str()?;
        check_tree_name(&name)?;
        c.finish()?;
        Ok(TreeKey {
            tree_id,
            epoch,
            name,
            root,
            admin: SigningKey::from_bytes(&seed),
        })
    }
}

impl FromStr for TreeKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        TreeKey::from_key_string(s)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
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

    #[test]
    fn subtree_grant_derives_children_not_siblings() {
        let tk = TreeKey::generate("home", &mut rng()).unwrap();
        let all = tk.grant_all();
        let kitchen = tk.grant(&Scope::Subtree(t("sensor/kitchen")));
        let temp = t("sensor/kitchen/temp");
        assert_eq!(kitchen.message_key(&temp), all.message_key(&temp));
        assert_eq!(
            kitchen.message_key(&t("sensor/kitchen")),
            all.message_key(&t("sensor/kitchen"))
        );
        assert_eq!(kitchen.message_key(&t("sensor/garage/temp")), None);
        assert!(kitchen.narrow(&t("sensor"), false).is_err());
        let one = kitchen.narrow(&temp, true).unwrap();
        assert_eq!(one.message_key(&temp), all.message_key(&temp));
        assert_eq!(one.message_key(&t("sensor/kitchen/temp/x")), None);
        assert!(one.narrow(&t("sensor/kitchen/temp/x"), false).is_err());
        // a/bc and ab/c are different keys (length prefix).
        assert_ne!(all.message_key(&t("a/bc")), all.message_key(&t("ab/c")));
    }

    #[test]
    fn key_strings_roundtrip_and_verify() {
        let tk = TreeKey::generate("home", &mut rng()).unwrap();
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
        let r_off = 1 + 16 + 8 + 2 + 4 + 32;
        raw[r_off] ^= 1;
        assert_eq!(
            Grant::from_bytes(&raw).unwrap_err(),
            KeyError::BadSignature("epoch certificate")
        );
    }

    #[test]
    fn rotation_changes_everything_but_tree_and_admin() {
        let tk = TreeKey::generate("home", &mut rng()).unwrap();
        let next = tk.rotate(&mut rng());
        assert_eq!(next.epoch(), 1);
        assert_eq!(next.tree_id(), tk.tree_id());
        assert_eq!(next.admin(), tk.admin());
        assert_ne!(next.cert().keys().key_id(), tk.cert().keys().key_id());
    }

    #[test]
    fn passphrase_trees_agree() {
        let fast = PassphraseParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let a = TreeKey::from_passphrase("family", b"correct horse battery staple", fast).unwrap();
        let b = TreeKey::from_passphrase("family", b"correct horse battery staple", fast).unwrap();
        let c = TreeKey::from_passphrase("family", b"wrong", fast).unwrap();
        assert_eq!(a.cert().keys().key_id(), b.cert().keys().key_id());
        assert_ne!(a.cert().keys().key_id(), c.cert().keys().key_id());
        assert_eq!(a.tree_id(), TreeId::from_name("family"));
    }

    #[test]
    fn tokens_are_position_bound() {
        let k = TreeKey::generate("x", &mut rng())
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
}
