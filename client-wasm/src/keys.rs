//! Identities, tree keys, grants, keyrings and invites, as JS classes. Every method takes
//! other key objects by reference, so JS objects stay usable after being passed in.

use crate::rng::Rng;
use wasm_bindgen::prelude::*;
use whispeer_protocol as p;

use crate::error::{invite_error, js_error, key_error, topic_error};
use crate::now_ms;

/// Parses a scope: `#` (or empty) for the whole tree, `a/b/#` for a subtree, `a/b` for
/// exactly one topic.
pub(crate) fn parse_scope(s: &str) -> Result<p::Scope, JsValue> {
    if s.is_empty() || s == "#" {
        return Ok(p::Scope::Tree);
    }
    if let Some(prefix) = s.strip_suffix("/#") {
        return Ok(p::Scope::Subtree(
            p::Topic::new(prefix).map_err(topic_error)?,
        ));
    }
    Ok(p::Scope::Topic(p::Topic::new(s).map_err(topic_error)?))
}

/// A zstd dictionary from its `wsdict1…` string or its raw bytes (a `Uint8Array`).
pub(crate) fn parse_dictionary(dict: &JsValue) -> Result<p::Dictionary, JsValue> {
    match dict.as_string() {
        Some(s) => p::Dictionary::from_key_string(&s),
        None if dict.is_instance_of::<js_sys::Uint8Array>()
            || dict.is_instance_of::<js_sys::ArrayBuffer>() =>
        {
            p::Dictionary::new(js_sys::Uint8Array::new(dict).to_vec())
        }
        None => {
            return Err(js_error(
                "KEY",
                "a dictionary is a 'wsdict1…' string or a Uint8Array of its bytes",
            ))
        }
    }
    .map_err(key_error)
}

/// A user's or device's secret keys: an Ed25519 signing key (its public half is the sender
/// id) and an X25519 key for receiving invites.
#[wasm_bindgen]
#[derive(Debug, Clone)]
pub struct Identity {
    pub(crate) inner: p::Identity,
}

#[wasm_bindgen]
impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Identity {
        Identity {
            inner: p::Identity::generate_with(&mut Rng),
        }
    }

    /// Restores an identity from its secret string (`wssec1…`).
    #[wasm_bindgen(js_name = fromSecretString)]
    pub fn from_secret_string(s: &str) -> Result<Identity, JsValue> {
        Ok(Identity {
            inner: p::Identity::from_secret_string(s.trim()).map_err(key_error)?,
        })
    }

    /// The secret string (`wssec1…`). Keep it secret.
    #[wasm_bindgen(js_name = toSecretString)]
    pub fn to_secret_string(&self) -> String {
        self.inner.to_secret_string().to_string()
    }

    /// The sender id (`wspk1…`): how receivers see messages this identity signed.
    #[wasm_bindgen(getter, js_name = senderId)]
    pub fn sender_id(&self) -> String {
        self.inner.sender_id().to_string()
    }

    /// The public id (`wsid1…`) others seal invites to.
    #[wasm_bindgen(getter, js_name = publicId)]
    pub fn public_id(&self) -> String {
        self.inner.public_id().to_string()
    }
}

/// A tree admin's key: the root of the current epoch and the admin signing key.
#[wasm_bindgen]
#[derive(Debug, Clone)]
pub struct TreeKey {
    pub(crate) inner: p::TreeKey,
}

#[wasm_bindgen]
impl TreeKey {
    /// A new tree with a random id and root.
    pub fn generate(name: &str) -> Result<TreeKey, JsValue> {
        Ok(TreeKey {
            inner: p::TreeKey::generate_with(name, &mut Rng).map_err(key_error)?,
        })
    }

    /// The tree everyone who knows `name` and `passphrase` derives (Argon2id). `options`
    /// may set `memoryKiB`, `iterations` and `lanes`; PROTOCOL §5.9 fixes them: the
    /// defaults (262144 KiB = 256 MiB, 2, 1, the Rust client's), or 65536 KiB, 3, 1 to
    /// reproduce a version-1 tree. Anything else — and a value that is not an integer
    /// (NaN, negative, fractional, above 2^32 − 1) — is refused (`KEY`) before Argon2 runs.
    #[wasm_bindgen(js_name = fromPassphrase)]
    pub fn from_passphrase(
        name: &str,
        passphrase: &str,
        options: JsValue,
    ) -> Result<TreeKey, JsValue> {
        let params = passphrase_params(|k| {
            if !options.is_object() {
                return None;
            }
            let v = js_sys::Reflect::get(&options, &JsValue::from_str(k)).ok()?;
            if v.is_undefined() || v.is_null() {
                return None;
            }
            Some(v.as_f64().unwrap_or(f64::NAN))
        })
        .map_err(key_error)?;
        Ok(TreeKey {
            inner: p::TreeKey::from_passphrase(name, passphrase.as_bytes(), params)
                .map_err(key_error)?,
        })
    }

    /// Parses an admin key string (`wstree1…`).
    #[wasm_bindgen(js_name = fromKeyString)]
    pub fn from_key_string(s: &str) -> Result<TreeKey, JsValue> {
        Ok(TreeKey {
            inner: p::TreeKey::from_key_string(s.trim()).map_err(key_error)?,
        })
    }

    /// The admin key string (`wstree1…`): whoever holds it controls the tree.
    #[wasm_bindgen(js_name = toKeyString)]
    pub fn to_key_string(&self) -> String {
        self.inner.to_key_string().to_string()
    }

    /// A grant for `scope` (`#` or omitted: the whole tree; `a/#`: a subtree; `a/b`: one
    /// topic).
    pub fn grant(&self, scope: Option<String>) -> Result<Grant, JsValue> {
        let scope = parse_scope(scope.as_deref().unwrap_or("#"))?;
        Ok(Grant {
            inner: self.inner.grant(&scope),
        })
    }

    /// An identity whose signing key is this tree's admin key: seal invites with it and the
    /// recipient sees the admin itself enrolled it (`inviterIsAdmin`, PROTOCOL §10). A
    /// secret like the tree key.
    #[wasm_bindgen(js_name = adminIdentity)]
    pub fn admin_identity(&self) -> Identity {
        Identity {
            inner: self.inner.admin_identity(),
        }
    }

    /// The next epoch: a fresh root, same tree and admin. Messages of earlier epochs dated
    /// from now on are refused by receivers holding the new epoch (the rotation cutoff).
    /// Throws for a passphrase tree (only epoch 0: choose a new passphrase instead).
    pub fn rotate(&self) -> Result<TreeKey, JsValue> {
        Ok(TreeKey {
            inner: self.inner.rotate(now_ms(), &mut Rng).map_err(key_error)?,
        })
    }

    /// The tree's display name.
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.inner.name().to_owned()
    }

    /// The epoch.
    #[wasm_bindgen(getter)]
    pub fn epoch(&self) -> f64 {
        self.inner.epoch() as f64
    }

    /// The tree id (hex).
    #[wasm_bindgen(getter, js_name = treeId)]
    pub fn tree_id(&self) -> String {
        hex::encode(self.inner.tree_id().0)
    }
}

/// A key for part of a tree (a subtree or one topic) with its signed epoch certificate.
#[wasm_bindgen]
#[derive(Debug, Clone)]
pub struct Grant {
    pub(crate) inner: p::Grant,
}

#[wasm_bindgen]
impl Grant {
    /// Parses a grant key string (`wskey1…`).
    #[wasm_bindgen(js_name = fromKeyString)]
    pub fn from_key_string(s: &str) -> Result<Grant, JsValue> {
        Ok(Grant {
            inner: p::Grant::from_key_string(s.trim()).map_err(key_error)?,
        })
    }

    /// The key string (`wskey1…`).
    #[wasm_bindgen(js_name = toKeyString)]
    pub fn to_key_string(&self) -> String {
        self.inner.to_key_string().to_string()
    }

    /// A narrower grant (`a/b/#` or `a/b`) inside this one's scope, signed by `by` as its
    /// narrower (receivers that cannot re-derive it treat it as delegated by `by`).
    pub fn narrow(&self, scope: &str, by: &Identity) -> Result<Grant, JsValue> {
        let inner = match parse_scope(scope)? {
            // `#` is this grant itself only when it covers the whole tree; from a subtree or
            // topic grant it is out of scope (PROTOCOL §5.6), as the CLI and
            // `Grant::narrow` say — handing back the narrower grant would give the caller
            // less than it asked for without telling it.
            p::Scope::Tree if matches!(self.inner.scope(), p::Scope::Tree) => self.inner.clone(),
            p::Scope::Tree => {
                return Err(key_error(p::KeyError::OutOfScope {
                    scope: self.inner.scope().to_string(),
                    target: "#".into(),
                }))
            }
            p::Scope::Subtree(t) => self.inner.narrow(&t, false, &by.inner).map_err(key_error)?,
            p::Scope::Topic(t) => self.inner.narrow(&t, true, &by.inner).map_err(key_error)?,
        };
        Ok(Grant { inner })
    }

    /// The scope (`#`, `a/#` or `a/b`).
    #[wasm_bindgen(getter)]
    pub fn scope(&self) -> String {
        self.inner.scope().to_string()
    }

    /// The tree's display name.
    #[wasm_bindgen(getter, js_name = treeName)]
    pub fn tree_name(&self) -> String {
        self.inner.cert().tree_name().to_owned()
    }

    /// The epoch.
    #[wasm_bindgen(getter)]
    pub fn epoch(&self) -> f64 {
        self.inner.epoch_keys().epoch() as f64
    }

    /// The tree id (hex).
    #[wasm_bindgen(getter, js_name = treeId)]
    pub fn tree_id(&self) -> String {
        hex::encode(self.inner.epoch_keys().tree_id().0)
    }
}

/// The set of grants a client holds.
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct Keyring {
    /// The grants `check` holds, in the order they were added (what `toKeyStrings`
    /// exports and `build` re-adds). Never more than `check` holds: a grant the protocol
    /// keyring dropped (a delegated grant contradicted by a later admin-signed one, an
    /// epoch older than the previous one after a rotation) or kept once (a duplicate) is
    /// left out here too. Otherwise the wrapper would export a forged grant the keyring
    /// had thrown away, and re-adding its strings (`Client.addKeys(keyring)`, a keyring
    /// rebuilt from a saved key file) would bring the forgery back or fail on it (review
    /// session 27, F4).
    grants: Vec<p::Grant>,
    check: p::Keyring,
    /// zstd dictionaries (codec 3), shared like keys (`wsdict1…`), each with the tree it
    /// came with (`None`: added without one, used for every tree; PROTOCOL §4.6.1). A
    /// dictionary carried for several trees has an entry per tree.
    dictionaries: Vec<(p::Dictionary, Option<p::TreeId>)>,
}

#[wasm_bindgen]
impl Keyring {
    /// An empty keyring.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Keyring {
        Keyring::default()
    }

    fn push(&mut self, g: p::Grant) -> Result<(), JsValue> {
        self.check
            .add_grant_at(g.clone(), now_ms())
            .map_err(key_error)?;
        self.grants.push(g);
        self.keep_held();
        Ok(())
    }

    /// Adds a grant.
    #[wasm_bindgen(js_name = addGrant)]
    pub fn add_grant(&mut self, grant: &Grant) -> Result<(), JsValue> {
        self.push(grant.inner.clone())
    }

    /// Adds the whole-tree grant of an admin key.
    #[wasm_bindgen(js_name = addTreeKey)]
    pub fn add_tree_key(&mut self, tree: &TreeKey) -> Result<(), JsValue> {
        self.push(tree.inner.grant_all())
    }

    /// Adds a zstd dictionary (codec 3, PROTOCOL §4.6.1) from its raw bytes (as
    /// `whispeer dict train` writes them) or its `wsdict1…` string; returns its id (32 hex
    /// digits), which a topic's compression names: `'zstd-dict:<id>'`. With `treeId` (32
    /// hex digits) it serves that tree's messages only; without, every tree's.
    #[wasm_bindgen(js_name = addDictionary)]
    pub fn add_dictionary(
        &mut self,
        dict: JsValue,
        tree_id: Option<String>,
    ) -> Result<String, JsValue> {
        let d = parse_dictionary(&dict)?;
        let tree = tree_id
            .as_deref()
            .map(crate::client::parse_tree_id)
            .transpose()?;
        let id = d.id().to_string();
        self.push_dictionary(d, tree)?;
        Ok(id)
    }

    /// The dictionaries as `wsdict1…` strings (secret like keys), each once.
    #[wasm_bindgen(js_name = toDictionaryStrings)]
    pub fn to_dictionary_strings(&self) -> Vec<String> {
        let mut seen = Vec::new();
        self.dictionaries
            .iter()
            .filter(|(d, _)| {
                let new = !seen.contains(&d.id());
                seen.push(d.id());
                new
            })
            .map(|(d, _)| d.to_key_string().to_string())
            .collect()
    }

    /// The dictionaries with the tree each came with: `[{ dictionary: 'wsdict1…', treeId?
    /// }]` (no `treeId`: added without a tree, used for every tree). What re-adding a
    /// keyring's dictionaries elsewhere passes to `addDictionary(dictionary, treeId)`.
    #[wasm_bindgen(js_name = toDictionaryEntries)]
    pub fn to_dictionary_entries(&self) -> js_sys::Array {
        let out = js_sys::Array::new();
        for (d, tree) in &self.dictionaries {
            let o = js_sys::Object::new();
            crate::client::set(&o, "dictionary", d.to_key_string().to_string());
            if let Some(t) = tree {
                crate::client::set(&o, "treeId", hex::encode(t.0));
            }
            out.push(&o);
        }
        out
    }

    /// Adds a key string: a grant (`wskey1…`), an admin key (`wstree1…`) or a zstd
    /// dictionary (`wsdict1…`).
    #[wasm_bindgen(js_name = addKeyString)]
    pub fn add_key_string(&mut self, s: &str) -> Result<(), JsValue> {
        let s = s.trim();
        // Key strings are bech32m: all-lowercase or all-uppercase (PROTOCOL §6.1).
        let hrp = |h: &str| s.get(..h.len()).is_some_and(|p| p.eq_ignore_ascii_case(h));
        if hrp("wsdict1") {
            let d = p::Dictionary::from_key_string(s).map_err(key_error)?;
            self.push_dictionary(d, None)
        } else if hrp("wstree1") {
            self.push(
                p::TreeKey::from_key_string(s)
                    .map_err(key_error)?
                    .grant_all(),
            )
        } else {
            self.push(p::Grant::from_key_string(s).map_err(key_error)?)
        }
    }

    /// Accepts an opened invite (PROTOCOL §7): adds its grant, then the zstd dictionaries it
    /// carries, and returns what it did (`acceptedObject`): `{ accepted, ignoredReason?,
    /// provenance?, treeId, epoch, scope, dictionariesAdded, dropped }`. A refused grant
    /// throws and adds nothing; an ignored one (its epoch is older than every epoch held of
    /// its tree) adds nothing either — no dictionary — and says so (`accepted: false`).
    /// Decide whether you trust `invite.inviter` first.
    #[wasm_bindgen(js_name = acceptInvite)]
    pub fn accept_invite(&mut self, invite: &OpenedInvite) -> Result<JsValue, JsValue> {
        let out = self
            .check
            .accept_invite_at(&invite.inner, now_ms())
            .map_err(key_error)?;
        if out.is_accepted() {
            self.grants.push(invite.inner.grant.clone());
            self.keep_held();
            // For the invite's tree only (PROTOCOL §4.6.1); `check` added them so already.
            let tree = out.tree_id;
            for d in &invite.inner.dictionaries {
                let held = |(h, t): &(p::Dictionary, Option<p::TreeId>)| {
                    h.id() == d.id() && *t == Some(tree)
                };
                if !self.dictionaries.iter().any(held) {
                    self.dictionaries.push((d.clone(), Some(tree)));
                }
            }
        }
        Ok(accepted_object(&out))
    }

    /// The grants held, as key strings (not those a later grant made the keyring drop).
    #[wasm_bindgen(js_name = toKeyStrings)]
    pub fn to_key_strings(&self) -> Vec<String> {
        self.grants
            .iter()
            .map(|g| g.to_key_string().to_string())
            .collect()
    }

    /// Number of grants held.
    #[wasm_bindgen(getter)]
    pub fn size(&self) -> usize {
        self.grants.len()
    }
}

impl Keyring {
    /// Drops from `grants` what `check` no longer holds, and repeats (see `grants`).
    /// Compared by key string: the held grant is the very grant added (the protocol
    /// keyring stores it as given), and key strings are small.
    fn keep_held(&mut self) {
        let held: Vec<_> = self.check.grants().map(|g| g.to_key_string()).collect();
        let mut kept = Vec::with_capacity(held.len());
        self.grants.retain(|g| {
            let k = g.to_key_string();
            if held.contains(&k) && !kept.contains(&k) {
                kept.push(k);
                true
            } else {
                false
            }
        });
    }

    /// Adds a dictionary unless held; refused (`KEY`) beyond the keyring's bound
    /// (`p::MAX_DICTIONARIES`), checked by `check`, which holds every dictionary too.
    fn push_dictionary(
        &mut self,
        d: p::Dictionary,
        tree: Option<p::TreeId>,
    ) -> Result<(), JsValue> {
        if !self
            .dictionaries
            .iter()
            .any(|(h, t)| h.id() == d.id() && *t == tree)
        {
            match tree {
                Some(t) => self.check.add_dictionary_for(t, d.clone()),
                None => self.check.try_add_dictionary(d.clone()),
            }
            .map_err(key_error)?;
            self.dictionaries.push((d, tree));
        }
        Ok(())
    }

    /// A protocol keyring with every grant and dictionary (for one client).
    pub(crate) fn build(&self) -> Result<p::Keyring, JsValue> {
        let mut kr = p::Keyring::new();
        for (d, tree) in &self.dictionaries {
            match tree {
                Some(t) => kr.add_dictionary_for(*t, d.clone()),
                None => kr.try_add_dictionary(d.clone()),
            }
            .map_err(key_error)?;
        }
        for g in &self.grants {
            kr.add_grant_at(g.clone(), now_ms()).map_err(key_error)?;
        }
        Ok(kr)
    }
}

/// An opened invite.
#[wasm_bindgen]
#[derive(Debug)]
pub struct OpenedInvite {
    inner: p::Invite,
}

#[wasm_bindgen]
impl OpenedInvite {
    /// The grant it carries.
    #[wasm_bindgen(getter)]
    pub fn grant(&self) -> Grant {
        Grant {
            inner: self.inner.grant.clone(),
        }
    }
    /// The inviter's sender id (`wspk1…`); decide whether you trust it.
    #[wasm_bindgen(getter)]
    pub fn inviter(&self) -> String {
        self.inner.inviter.to_string()
    }
    /// The inviter is the tree's admin key, not a member (PROTOCOL §10: a member removed by
    /// a rotation can still hand out the old epoch; confirm with the admin that `epoch` is
    /// current when this is `false`).
    #[wasm_bindgen(getter, js_name = inviterIsAdmin)]
    pub fn inviter_is_admin(&self) -> bool {
        self.inner.inviter_is_admin()
    }
    /// Unix ms after which the invite is refused.
    #[wasm_bindgen(getter, js_name = expiresAt)]
    pub fn expires_at(&self) -> f64 {
        self.inner.expiry_ms as f64
    }
    /// The zstd dictionaries it carries, as `wsdict1…` strings (secret like keys), by
    /// ascending id; empty for an invite without any.
    #[wasm_bindgen(getter)]
    pub fn dictionaries(&self) -> Vec<String> {
        self.inner
            .dictionaries
            .iter()
            .map(|d| d.to_key_string().to_string())
            .collect()
    }
    /// Their ids (32 hex digits each), in the same order: what `'zstd-dict:<id>'` names.
    #[wasm_bindgen(getter, js_name = dictionaryIds)]
    pub fn dictionary_ids(&self) -> Vec<String> {
        self.inner
            .dictionaries
            .iter()
            .map(|d| d.id().to_string())
            .collect()
    }
}

/// What accepting an invite did, for JS: `{ accepted, ignoredReason?, provenance?, treeId,
/// epoch, scope, inviter, inviterIsAdmin, dictionariesAdded, dropped }` (README, "Invites").
fn accepted_object(a: &p::Accepted) -> JsValue {
    use crate::client::{provenance_object, set};
    let o = js_sys::Object::new();
    set(&o, "accepted", a.is_accepted());
    if let Some(why) = &a.ignored {
        set(&o, "ignoredReason", why.to_string());
    }
    if let Some(prov) = &a.provenance {
        set(&o, "provenance", provenance_object(prov));
    }
    set(&o, "treeId", hex::encode(a.tree_id.0));
    set(&o, "epoch", a.epoch as f64);
    set(&o, "scope", a.scope.to_string());
    set(&o, "inviter", a.inviter.to_string());
    set(&o, "inviterIsAdmin", a.inviter_is_admin);
    let ids = js_sys::Array::new();
    for id in &a.dictionaries_added {
        ids.push(&JsValue::from(id.to_string()));
    }
    set(&o, "dictionariesAdded", ids);
    let dropped = js_sys::Array::new();
    for d in &a.dropped {
        dropped.push(&JsValue::from(d.scope.to_string()));
    }
    set(&o, "dropped", dropped);
    o.into()
}

/// Seals `grant` and `dictionaries` (an array of `wsdict1…` strings or `Uint8Array`s; may
/// be empty) to the holder of `recipient_public_id` (`wsid1…`), signed by `inviter`, valid
/// for `ttl_ms` from now. Without dictionaries the invite is format 2 (older clients open
/// it); with them format 3 (PROTOCOL §7).
#[wasm_bindgen(js_name = sealInvite)]
pub fn seal_invite(
    grant: &Grant,
    inviter: &Identity,
    recipient_public_id: &str,
    ttl_ms: f64,
    dictionaries: Vec<JsValue>,
) -> Result<String, JsValue> {
    let recipient: p::PublicId = recipient_public_id.trim().parse().map_err(key_error)?;
    if ttl_ms.is_nan() || ttl_ms < 0.0 {
        return Err(js_error("INVITE", "ttl must be a non-negative number"));
    }
    let dictionaries = dictionaries
        .iter()
        .map(parse_dictionary)
        .collect::<Result<Vec<_>, _>>()?;
    p::Invite::seal_with_dictionaries(
        &grant.inner,
        &dictionaries,
        &inviter.inner,
        &recipient,
        now_ms().saturating_add(ttl_ms as u64),
        &mut Rng,
    )
    .map_err(invite_error)
}

/// Opens an invite (`wsinv1…`) addressed to `me`, checking its signature and expiry.
#[wasm_bindgen(js_name = openInvite)]
pub fn open_invite(invite: &str, me: &Identity) -> Result<OpenedInvite, JsValue> {
    let inner = p::Invite::open(invite.trim(), &me.inner, now_ms()).map_err(invite_error)?;
    Ok(OpenedInvite { inner })
}

/// [`TreeKey::from_passphrase`]'s parameters from its options (`get`: an option's number, NaN
/// for a value that is not one, `None` when absent): each an integer from 0 to 2^32 − 1
/// (before, `as u32` turned NaN and negatives into 0 and 1e12 into 2^32 − 1), absent ones
/// the defaults, and the whole checked against PROTOCOL §5.9 ([`p::PassphraseParams::check`]).
fn passphrase_params(
    get: impl Fn(&str) -> Option<f64>,
) -> Result<p::PassphraseParams, p::KeyError> {
    let d = p::PassphraseParams::default();
    let one = |k: &str, dflt: u32| -> Result<u32, p::KeyError> {
        match get(k) {
            None => Ok(dflt),
            Some(v) if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) => Ok(v as u32),
            Some(v) => Err(p::KeyError::Passphrase(format!(
                "option {k} must be an integer from 0 to 4294967295, got {v}"
            ))),
        }
    };
    let params = p::PassphraseParams {
        m_kib: one("memoryKiB", d.m_kib)?,
        t: one("iterations", d.t)?,
        p: one("lanes", d.p)?,
    };
    params.check()?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p::kdf::{kh, tag};
    use p::text::{self, hrp};

    fn t(s: &str) -> p::Topic {
        p::Topic::new(s).unwrap()
    }

    /// Puts the scope on the wire as grants sign it: kind ‖ u16be(len) ‖ path.
    fn put_scope(out: &mut Vec<u8>, s: &p::Scope) {
        out.push(s.kind_byte());
        out.extend_from_slice(&(s.path().len() as u16).to_be_bytes());
        out.extend_from_slice(s.path().as_bytes());
    }

    /// What a malicious member hands out: `real` (a narrowed grant she made, `wskey1…`)
    /// with its key replaced by `key` and re-signed with her own key (`narrower`,
    /// `wssec1…`), from public APIs only. The signature is valid; only the key is a lie.
    fn forge(real: &p::Grant, narrower: &str, key: [u8; 32]) -> p::Grant {
        let parent = real.narrowed_from().expect("a narrowed grant").clone();
        let mut b = text::decode(hrp::GRANT, &real.to_key_string()).unwrap();
        // … key (32) ‖ AUTH_NARROWED (1) ‖ parent kind (1) ‖ lp(path) ‖ by (32) ‖ sig (64)
        let tail = 1 + 1 + 2 + parent.path().len() + 32 + 64;
        let at = b.len() - tail - 32;
        b[at..at + 32].copy_from_slice(&key);
        let keys = real.epoch_keys();
        let mut m = b"whispeer/v2/grant-narrow\0".to_vec();
        m.extend_from_slice(&keys.tree_id().0);
        m.extend_from_slice(&keys.epoch().to_be_bytes());
        put_scope(&mut m, real.scope());
        m.extend_from_slice(kh(&key, tag::GRANT_COMMIT, &[]).as_bytes());
        put_scope(&mut m, &parent);
        let sec = text::decode(hrp::SECRET, narrower).unwrap();
        let seed: [u8; 32] = sec[1..33].try_into().unwrap();
        let sig = ed25519_dalek::Signer::sign(&ed25519_dalek::SigningKey::from_bytes(&seed), &m);
        let n = b.len();
        b[n - 64..].copy_from_slice(&sig.to_bytes());
        p::Grant::from_key_string(&text::encode(hrp::GRANT, &b)).expect("well signed")
    }

    /// `tk`, and a grant for `sensor/kitchen/#` narrowed by a member with a key she chose.
    fn forged_under(tk: &TreeKey) -> (Grant, Identity) {
        let mallory = Identity::generate();
        let real = tk
            .inner
            .grant(&p::Scope::Subtree(t("sensor")))
            .narrow(&t("sensor/kitchen"), false, &mallory.inner)
            .unwrap();
        let inner = forge(&real, &mallory.to_secret_string(), [0x66; 32]);
        (Grant { inner }, mallory)
    }

    fn strings(kr: &Keyring) -> Vec<String> {
        kr.to_key_strings()
    }

    /// Review finding: `TreeKey.fromPassphrase` passed any `memoryKiB`/`iterations`/`lanes`
    /// to Argon2id (8 KiB and 1 pass succeeded: cheap offline guessing for anyone with a key
    /// id; NaN or negative became 0; 1e12 aborted the wasm instance). PROTOCOL §5.9 fixes
    /// them.
    #[test]
    fn from_passphrase_options_are_the_spec_parameters_only() {
        let opts = |m: Option<f64>, t: Option<f64>, l: Option<f64>| {
            passphrase_params(move |k| match k {
                "memoryKiB" => m,
                "iterations" => t,
                "lanes" => l,
                _ => None,
            })
        };
        assert_eq!(opts(None, None, None), Ok(p::PassphraseParams::SPEC));
        assert_eq!(
            opts(Some(262144.0), Some(2.0), Some(1.0)),
            Ok(p::PassphraseParams::SPEC)
        );
        assert_eq!(
            opts(Some(65536.0), Some(3.0), None),
            Ok(p::PassphraseParams::V1)
        );
        for (m, t, l) in [
            (Some(8.0), Some(1.0), None),
            (Some(1024.0), Some(1.0), None),
            (Some(65536.0), None, None),
            (None, Some(1.0), None),
            (None, None, Some(4.0)),
            (Some(4194304.0), None, None),
            (Some(4294967295.0), None, None),
        ] {
            assert!(
                matches!(opts(m, t, l), Err(p::KeyError::PassphraseParams { .. })),
                "{m:?} {t:?} {l:?}"
            );
        }
        for bad in [f64::NAN, -1.0, -0.5, 0.5, 262144.5, 1e12, f64::INFINITY] {
            assert!(
                matches!(opts(Some(bad), None, None), Err(p::KeyError::Passphrase(_))),
                "{bad}"
            );
            assert!(opts(None, Some(bad), None).is_err(), "{bad}");
            assert!(opts(None, None, Some(bad)).is_err(), "{bad}");
        }
    }

    /// Review of session 27, docs item 3: key strings are all-lowercase or all-uppercase
    /// (PROTOCOL §6.1); an uppercase admin key was sent to the grant parser ("wrong kind").
    #[test]
    fn an_uppercase_key_string_is_read_as_its_kind() {
        let tk = TreeKey::generate("home").unwrap();
        let mut kr = Keyring::new();
        kr.add_key_string(&tk.to_key_string().to_uppercase())
            .expect("an uppercase wstree1 string");
        let g = tk.grant(Some("a/#".into())).unwrap();
        kr.add_key_string(&format!(" {} ", g.to_key_string().to_uppercase()))
            .expect("an uppercase wskey1 string");
    }

    #[test]
    fn a_grant_the_protocol_keyring_dropped_is_neither_kept_nor_exported() {
        let tk = TreeKey::generate("home").unwrap();
        let (forged, mallory) = forged_under(&tk);
        assert_eq!(
            forged.inner.claimed_provenance(),
            p::Provenance::Delegated {
                by: mallory.inner.sender_id()
            }
        );
        // The forgery first (accepted as delegated), then the admin-signed sensor/#: the
        // protocol keyring drops the forgery, and so does the wrapper.
        let admin_sensor = tk.grant(Some("sensor/#".into())).unwrap();
        let mut kr = Keyring::new();
        kr.add_grant(&forged).unwrap();
        assert_eq!(kr.size(), 1);
        kr.add_grant(&admin_sensor).unwrap();
        assert_eq!(kr.size(), 1, "the forgery is gone");
        assert_eq!(strings(&kr), [admin_sensor.to_key_string()]);
        // The same with the whole tree's key.
        let mut kr = Keyring::new();
        kr.add_grant(&forged).unwrap();
        kr.add_tree_key(&tk).unwrap();
        assert_eq!(kr.size(), 1);
        assert!(!strings(&kr).contains(&forged.to_key_string()));
        // What it exports re-adds cleanly into a fresh keyring (and builds one for a
        // client): before, the forgery came first and the tree key then dropped it again,
        // or, re-added after the tree key, it was refused.
        let mut again = Keyring::new();
        for s in strings(&kr) {
            again.add_key_string(&s).unwrap();
        }
        assert_eq!(again.size(), 1);
        assert_eq!(kr.build().unwrap().grants().count(), 1);
    }

    #[test]
    fn repeats_and_epochs_the_keyring_no_longer_holds_are_not_exported() {
        let e0 = TreeKey::generate("home").unwrap();
        let mut kr = Keyring::new();
        kr.add_tree_key(&e0).unwrap();
        kr.add_tree_key(&e0).unwrap();
        kr.add_key_string(&e0.to_key_string()).unwrap();
        assert_eq!(kr.size(), 1, "one grant, added three times");
        // After two rotations epoch 0 is dropped (only the previous epoch is kept).
        let e1 = e0.rotate().unwrap();
        let e2 = e1.rotate().unwrap();
        kr.add_tree_key(&e1).unwrap();
        kr.add_tree_key(&e2).unwrap();
        assert_eq!(kr.size(), 2);
        assert_eq!(
            strings(&kr),
            [e1.grant(None).unwrap(), e2.grant(None).unwrap()].map(|g| g.to_key_string())
        );
    }

    /// The Node tests (`test/node/fixtures/forged-grant.json`) use a forgery made by
    /// [`forge`]: it must still parse, be delegated by its narrower, and be contradicted
    /// by the tree key.
    #[test]
    fn the_node_fixture_is_a_forgery_the_tree_key_contradicts() {
        let json = include_str!("../test/node/fixtures/forged-grant.json");
        let field = |k: &str| {
            let at = json.find(&format!("\"{k}\": \"")).unwrap() + k.len() + 5;
            json[at..at + json[at..].find('"').unwrap()].to_owned()
        };
        let tk = TreeKey::from_key_string(&field("tree")).unwrap();
        let forged = Grant::from_key_string(&field("forged")).unwrap();
        assert_eq!(
            forged.inner.claimed_provenance(),
            p::Provenance::Delegated {
                by: field("narrower").parse().unwrap()
            }
        );
        assert_eq!(forged.scope(), "sensor/kitchen/#");
        let mut check = p::Keyring::new();
        check.add_tree_key_at(&tk.inner, 0).unwrap();
        assert!(matches!(
            check.add_grant_at(forged.inner.clone(), 0),
            Err(p::KeyError::Contradicts { .. })
        ));
        let mut kr = Keyring::new();
        kr.add_grant(&forged).unwrap();
        kr.add_tree_key(&tk).unwrap();
        assert_eq!(strings(&kr), [tk.grant(None).unwrap().to_key_string()]);
    }
}
