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
    /// may set `memoryKiB`, `iterations` and `lanes`; the defaults (256 MiB, 2, 1) are the
    /// Rust client's, and both sides must use the same.
    #[wasm_bindgen(js_name = fromPassphrase)]
    pub fn from_passphrase(
        name: &str,
        passphrase: &str,
        options: JsValue,
    ) -> Result<TreeKey, JsValue> {
        let d = p::PassphraseParams::default();
        let get = |k: &str, dflt: u32| -> u32 {
            if !options.is_object() {
                return dflt;
            }
            js_sys::Reflect::get(&options, &JsValue::from_str(k))
                .ok()
                .and_then(|v| v.as_f64())
                .map(|v| v as u32)
                .unwrap_or(dflt)
        };
        let params = p::PassphraseParams {
            m_kib: get("memoryKiB", d.m_kib),
            t: get("iterations", d.t),
            p: get("lanes", d.p),
        };
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
            p::Scope::Tree => self.inner.clone(),
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
    grants: Vec<p::Grant>,
    check: p::Keyring,
    /// zstd dictionaries (codec 3), shared like keys (`wsdict1…`).
    dictionaries: Vec<p::Dictionary>,
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
    /// digits), which a topic's compression names: `'zstd-dict:<id>'`.
    #[wasm_bindgen(js_name = addDictionary)]
    pub fn add_dictionary(&mut self, dict: JsValue) -> Result<String, JsValue> {
        let d = parse_dictionary(&dict)?;
        let id = d.id().to_string();
        self.push_dictionary(d);
        Ok(id)
    }

    /// The dictionaries as `wsdict1…` strings (secret like keys).
    #[wasm_bindgen(js_name = toDictionaryStrings)]
    pub fn to_dictionary_strings(&self) -> Vec<String> {
        self.dictionaries
            .iter()
            .map(|d| d.to_key_string().to_string())
            .collect()
    }

    /// Adds a key string: a grant (`wskey1…`), an admin key (`wstree1…`) or a zstd
    /// dictionary (`wsdict1…`).
    #[wasm_bindgen(js_name = addKeyString)]
    pub fn add_key_string(&mut self, s: &str) -> Result<(), JsValue> {
        let s = s.trim();
        if s.get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("wsdict1"))
        {
            let d = p::Dictionary::from_key_string(s).map_err(key_error)?;
            self.push_dictionary(d);
            Ok(())
        } else if s.starts_with("wstree1") {
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
    /// carries. A refused grant adds nothing. Decide whether you trust `invite.inviter`
    /// first.
    #[wasm_bindgen(js_name = acceptInvite)]
    pub fn accept_invite(&mut self, invite: &OpenedInvite) -> Result<(), JsValue> {
        self.push(invite.grant.clone())?;
        for d in &invite.dictionaries {
            self.push_dictionary(d.clone());
        }
        Ok(())
    }

    /// The grants as key strings.
    #[wasm_bindgen(js_name = toKeyStrings)]
    pub fn to_key_strings(&self) -> Vec<String> {
        self.grants
            .iter()
            .map(|g| g.to_key_string().to_string())
            .collect()
    }

    /// Number of grants.
    #[wasm_bindgen(getter)]
    pub fn size(&self) -> usize {
        self.grants.len()
    }
}

impl Keyring {
    fn push_dictionary(&mut self, d: p::Dictionary) {
        if !self.dictionaries.iter().any(|h| h.id() == d.id()) {
            self.dictionaries.push(d);
        }
    }

    /// A protocol keyring with every grant and dictionary (for one client).
    pub(crate) fn build(&self) -> Result<p::Keyring, JsValue> {
        let mut kr = p::Keyring::new();
        for d in &self.dictionaries {
            kr.add_dictionary(d.clone());
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
    grant: p::Grant,
    inviter: String,
    expiry_ms: u64,
    dictionaries: Vec<p::Dictionary>,
}

#[wasm_bindgen]
impl OpenedInvite {
    /// The grant it carries.
    #[wasm_bindgen(getter)]
    pub fn grant(&self) -> Grant {
        Grant {
            inner: self.grant.clone(),
        }
    }
    /// The inviter's sender id (`wspk1…`); decide whether you trust it.
    #[wasm_bindgen(getter)]
    pub fn inviter(&self) -> String {
        self.inviter.clone()
    }
    /// Unix ms after which the invite is refused.
    #[wasm_bindgen(getter, js_name = expiresAt)]
    pub fn expires_at(&self) -> f64 {
        self.expiry_ms as f64
    }
    /// The zstd dictionaries it carries, as `wsdict1…` strings (secret like keys), by
    /// ascending id; empty for an invite without any.
    #[wasm_bindgen(getter)]
    pub fn dictionaries(&self) -> Vec<String> {
        self.dictionaries
            .iter()
            .map(|d| d.to_key_string().to_string())
            .collect()
    }
    /// Their ids (32 hex digits each), in the same order: what `'zstd-dict:<id>'` names.
    #[wasm_bindgen(getter, js_name = dictionaryIds)]
    pub fn dictionary_ids(&self) -> Vec<String> {
        self.dictionaries
            .iter()
            .map(|d| d.id().to_string())
            .collect()
    }
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
    let i = p::Invite::open(invite.trim(), &me.inner, now_ms()).map_err(invite_error)?;
    Ok(OpenedInvite {
        grant: i.grant,
        inviter: i.inviter.to_string(),
        expiry_ms: i.expiry_ms,
        dictionaries: i.dictionaries,
    })
}
