//! Keys, identity and sealing for JS: `ClientCore` seals and opens with the Rust client
//! core (`whispeer::core`); the connection engine (`crate::engine`) takes it over.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use js_sys::{Object, Reflect, Uint8Array};

use crate::rng::Rng;
use wasm_bindgen::prelude::*;
use whispeer::core::connection::AccountAuth;
use whispeer::core::{self, Received, SealPolicy};
use whispeer_protocol::{
    Compression, Envelope, Keyring as PKeyring, Opener, Padding, Provenance, Scope, SealOptions,
    Sealer, SenderId, Suite, Topic, TopicFilter, TopicKey, TreeId,
};

use crate::error::{js_error, key_error, publish_error, topic_error};
use crate::keys::{Grant, Identity, Keyring};
use crate::{now_ms, value};

/// `o[k] = v`. Property names are interned: converted to a JS string once, then reused from
/// wasm-bindgen's cache (a message object sets a dozen of them per delivery).
pub(crate) fn set(o: &Object, k: &str, v: impl Into<JsValue>) {
    let _ = Reflect::set(o, &JsValue::from_str(wasm_bindgen::intern(k)), &v.into());
}

pub(crate) fn bytes(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

/// The compression a JS caller asked for: a zstd level (0 = none), or a name the protocol
/// parses (`'none'`, `'zstd'`, `'zstd:N'`, `'lz4'`).
fn compression(c: &JsValue) -> Result<Compression, JsValue> {
    if let Some(level) = c.as_f64() {
        let level = level as i32;
        return Ok(if level <= 0 {
            Compression::None
        } else {
            Compression::Zstd(level.min(22))
        });
    }
    c.as_string()
        .and_then(|s| Compression::from_name(&s))
        .ok_or_else(|| {
            js_error(
                "INVALID_OPTION",
                "compression: expected 'zstd', 'lz4', 'none' or a zstd level 1-22",
            )
        })
}

/// `'xchacha'` (XChaCha20-Poly1305) or `'aes-gcm'` (AES-256-GCM).
fn suite(s: &str) -> Result<Suite, JsValue> {
    Suite::from_name(s)
        .ok_or_else(|| js_error("INVALID_OPTION", "suite: expected 'xchacha' or 'aes-gcm'"))
}

fn seal_options(compression: Compression, padding: bool, suite: Suite) -> SealOptions {
    SealOptions {
        compression,
        padding: if padding {
            Padding::Padme
        } else {
            Padding::None
        },
        suite,
    }
}

/// A grant's provenance as a JS object: `{ kind: "admin-signed" }`,
/// `{ kind: "derived", from: SCOPE }` or `{ kind: "delegated", by: SENDER_ID }`.
pub(crate) fn provenance_object(p: &Provenance) -> JsValue {
    let o = Object::new();
    match p {
        Provenance::AdminSigned => set(&o, "kind", "admin-signed"),
        Provenance::Derived { from } => {
            set(&o, "kind", "derived");
            set(&o, "from", from.to_string());
        }
        Provenance::Delegated { by } => {
            set(&o, "kind", "delegated");
            set(&o, "by", by.to_string());
        }
        // A kind this build does not know: named, never dropped.
        #[allow(unreachable_patterns)]
        other => set(&o, "kind", other.to_string()),
    }
    o.into()
}

/// A tree id as `treeId` prints it (32 hex digits).
pub(crate) fn parse_tree_id(s: &str) -> Result<TreeId, JsValue> {
    let bad = || {
        js_error(
            "INVALID_TREE",
            &format!("a tree id is 32 hex digits (as a message's treeId), got {s:?}"),
        )
    };
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(TreeId(id))
}

/// A scope as grants print it: `#` (whole tree), `a/b/#` (subtree), `a/b` (one topic).
fn parse_scope(s: &str) -> Result<Scope, JsValue> {
    if s == "#" {
        return Ok(Scope::Tree);
    }
    match s.strip_suffix("/#") {
        Some(p) => Ok(Scope::Subtree(Topic::new(p).map_err(topic_error)?)),
        None => Ok(Scope::Topic(Topic::new(s).map_err(topic_error)?)),
    }
}

/// A delivered message as a JS object (`value` decoded when the content type is CBOR,
/// tagged with a type or not).
pub(crate) fn message_object(r: &Received) -> JsValue {
    let o = Object::new();
    set(&o, "topic", r.topic.as_str());
    set(
        &o,
        "sender",
        r.sender
            .map(|s| JsValue::from_str(&s.to_string()))
            .unwrap_or(JsValue::NULL),
    );
    set(&o, "id", hex::encode(r.msg_id.0));
    set(&o, "timestamp", r.ts_ms as f64);
    set(&o, "seq", r.seq as f64);
    set(&o, "retained", r.retained);
    set(&o, "treeId", hex::encode(r.tree_id.0));
    set(&o, "epoch", r.epoch as f64);
    set(&o, "provenance", provenance_object(&r.provenance));
    set(&o, "contentType", r.content_type.as_str());
    set(&o, "payload", bytes(&r.payload));
    if whispeer::tag::is_cbor(&r.content_type) {
        match value::decode(&r.payload) {
            Ok(v) => set(&o, "value", v),
            Err(e) => set(&o, "error", e),
        }
    }
    o.into()
}

/// Layout of an opened message in wasm memory, read by `js/message.js` (`readMessage`),
/// which builds the same object as [`message_object`] from it with one UTF-8 decode and
/// one copy of the payload instead of a dozen property sets across the boundary.
/// Little-endian; the offsets must match `js/message.js`.
///
/// ```text
///  0  u32  total length          4  u8 flags (1 retained, 2 sender, 4 CBOR value)
///  5  u8   provenance kind (0 admin-signed, 1 derived, 2 delegated, 3 other)
///  8  f64  timestamp            16  f64 seq             24  f64 epoch
/// 32  u32  payload offset       36  u32 payload length  40  u32 UTF-8 length of the strings
/// 44  u32  UTF-16 lengths of: topic, sender, id, treeId, contentType, provenance detail
/// 68  the strings (UTF-8, in that order), then the payload
/// ```
pub(crate) mod layout {
    pub const FLAG_RETAINED: u8 = 1;
    pub const FLAG_SENDER: u8 = 2;
    pub const FLAG_CBOR: u8 = 4;
    pub const STRINGS: usize = 68;
}

/// Writes `r` to `out` in the [`layout`] read by `js/message.js` (clearing `out` first).
/// The text form of the last few senders (bech32m, with its checksum: a few µs in wasm, 4 %
/// of opening a batch-signed message when computed for each message). Most recent first.
#[derive(Debug, Default)]
pub(crate) struct SenderNames(std::collections::VecDeque<(SenderId, String)>);

impl SenderNames {
    const CAP: usize = 8;

    fn name(&mut self, s: &SenderId) -> &str {
        match self.0.iter().position(|(id, _)| id == s) {
            Some(0) => {}
            Some(i) => {
                let e = self.0.remove(i).expect("present");
                self.0.push_front(e);
            }
            None => {
                self.0.truncate(Self::CAP - 1);
                self.0.push_front((*s, s.to_string()));
            }
        }
        &self.0[0].1
    }
}

pub(crate) fn write_message(r: &Received, names: &mut SenderNames, out: &mut Vec<u8>) {
    out.clear();
    out.resize(layout::STRINGS, 0);
    let mut flags = 0;
    if r.retained {
        flags |= layout::FLAG_RETAINED;
    }
    if r.sender.is_some() {
        flags |= layout::FLAG_SENDER;
    }
    if whispeer::tag::is_cbor(&r.content_type) {
        flags |= layout::FLAG_CBOR;
    }
    out[4] = flags;
    out[8..16].copy_from_slice(&(r.ts_ms as f64).to_le_bytes());
    out[16..24].copy_from_slice(&(r.seq as f64).to_le_bytes());
    out[24..32].copy_from_slice(&(r.epoch as f64).to_le_bytes());
    // The strings, each followed by its UTF-16 length in the table at 44.
    let mut lens = [0u32; 6];
    let mut push = |out: &mut Vec<u8>, i: usize, s: &str| {
        out.extend_from_slice(s.as_bytes());
        lens[i] = if s.is_ascii() {
            s.len()
        } else {
            s.encode_utf16().count()
        } as u32;
    };
    push(out, 0, r.topic.as_str());
    if let Some(s) = &r.sender {
        push(out, 1, names.name(s));
    }
    let mut hex = [0u8; 32];
    for (i, id) in [&r.msg_id.0, &r.tree_id.0].into_iter().enumerate() {
        hex::encode_to_slice(id, &mut hex).expect("16 bytes are 32 hex digits");
        push(out, 2 + i, std::str::from_utf8(&hex).expect("hex is ASCII"));
    }
    push(out, 4, &r.content_type);
    let kind = match &r.provenance {
        Provenance::AdminSigned => 0,
        Provenance::Derived { from } => {
            push(out, 5, &from.to_string());
            1
        }
        Provenance::Delegated { by } => {
            push(out, 5, &by.to_string());
            2
        }
        // A kind this build does not know: named, never dropped.
        #[allow(unreachable_patterns)]
        other => {
            push(out, 5, &other.to_string());
            3
        }
    };
    out[5] = kind;
    let strings = out.len() - layout::STRINGS;
    let payload_at = out.len();
    out.extend_from_slice(&r.payload);
    let total = out.len();
    let mut put = |at: usize, v: usize| out[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
    put(0, total);
    put(32, payload_at);
    put(36, r.payload.len());
    put(40, strings);
    for (i, l) in lens.iter().enumerate() {
        put(44 + 4 * i, *l as usize);
    }
}

/// The message counters as a JS object.
pub(crate) fn core_stats_object(s: &core::CoreStats) -> Object {
    let o = Object::new();
    set(&o, "delivered", s.delivered as f64);
    set(&o, "rejected", s.rejected as f64);
    set(&o, "duplicates", s.duplicates as f64);
    set(&o, "relayGaps", s.relay_gaps as f64);
    set(&o, "heldBack", s.held_back as f64);
    set(&o, "heldForOrder", s.held_for_order as f64);
    set(&o, "namedPaused", s.named_paused as f64);
    set(&o, "withheldLost", s.withheld_lost as f64);
    set(&o, "batchRootHits", s.batch_root_hits as f64);
    set(&o, "missingDictionary", s.missing_dictionary as f64);
    let r = Object::new();
    set(&r, "beforeHorizon", s.refused.before_horizon as f64);
    set(&r, "beforeWindow", s.refused.before_window as f64);
    set(&r, "future", s.refused.future as f64);
    set(&r, "staleLive", s.refused.stale_live as f64);
    set(&r, "retainedRollback", s.refused.retained_rollback as f64);
    set(&r, "unsigned", s.refused.unsigned as f64);
    set(&r, "unlistedSender", s.refused.unlisted_sender as f64);
    set(&r, "restoredFuture", s.refused.restored_future as f64);
    set(&r, "marksEvicted", s.refused.marks_evicted as f64);
    set(&o, "refused", r);
    o
}

/// The low-level client: keys, identity, relay account, sealing and opening. Not connected
/// to anything: the connection engine (`Engine`) takes it over to seal what it publishes.
#[wasm_bindgen]
#[derive(Debug)]
pub struct ClientCore {
    pub(crate) keyring: Arc<RwLock<PKeyring>>,
    pub(crate) identity: Option<whispeer_protocol::Identity>,
    policy: SealPolicy,
    /// The suite each `policy.per_topic` rule named (same index); `None`: the default
    /// suite as finally configured, which `setSuite` writes into the rule.
    rule_suites: Vec<Option<Suite>>,
    sealer: Sealer,
    opener: Opener,
    /// Relay account: an Ed25519 key (answers `Challenge`) or a bearer token (never the
    /// identity that signs messages).
    pub(crate) relay_auth: Option<AccountAuth>,
    /// Sealing keys of the topics published to without a `tree` (a key derivation per topic
    /// level saved per publish). Emptied on every keyring change: writes go through
    /// [`ClientCore::keys_mut`].
    sealing_keys: HashMap<String, TopicKey>,
    /// Text forms of recent senders, for [`write_message`].
    sender_names: SenderNames,
    /// The last message `openEnvelopeAt` opened ([`layout`]).
    scratch: Vec<u8>,
    /// Its CBOR value, until `takeValue`.
    value: Option<Result<JsValue, JsValue>>,
}

/// A publish's tree (32 hex digits, when given) and topic, checked.
fn parse_target(
    tree: Option<String>,
    topic: &str,
) -> Result<(Option<whispeer_protocol::TreeId>, Topic), JsValue> {
    let tree = tree.as_deref().map(parse_tree_id).transpose()?;
    Ok((tree, Topic::new(topic).map_err(topic_error)?))
}

/// The sealing key for a publish to `topic` (in `tree`, when given): from `cache` when
/// there is no tree and the topic was sealed to before, else looked up in the keyring
/// (the checks and errors of [`core::seal_publish_in`]) and, without a tree, kept.
fn sealing_key<'c>(
    cache: &'c mut HashMap<String, TopicKey>,
    keyring: &RwLock<PKeyring>,
    tree: Option<String>,
    topic: &str,
) -> Result<Cow<'c, TopicKey>, JsValue> {
    /// Topics kept at most (the cache is emptied beyond).
    const MAX_CACHED: usize = 1024;
    if tree.is_none() && cache.contains_key(topic) {
        return Ok(Cow::Borrowed(&cache[topic]));
    }
    let (tree, t) = parse_target(tree, topic)?;
    let kr = keyring.read().expect("keyring lock");
    let key = match tree {
        Some(id) => kr.topic_key_in(id, &t),
        None => kr.topic_key(&t),
    }
    .map_err(|e| publish_error(e.into()))?;
    if tree.is_some() {
        return Ok(Cow::Owned(key));
    }
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    Ok(Cow::Borrowed(cache.entry(topic.to_owned()).or_insert(key)))
}

/// Prefix of a relay account key (`whispeer-relay account add NAME --key-out FILE`).
const ACCOUNT_KEY_PREFIX: &str = "wsp_acct_sk_";

fn parse_account_key(text: &str) -> Option<ed25519_dalek::SigningKey> {
    let h = text.trim().strip_prefix(ACCOUNT_KEY_PREFIX)?;
    if h.len() != 64 || !h.is_ascii() {
        return None;
    }
    // Wiped when dropped, also on an early return (zeroize's writes are not optimized away,
    // as a plain loop's zeroing of a buffer never read again may be).
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(ed25519_dalek::SigningKey::from_bytes(&seed))
}

#[wasm_bindgen]
impl ClientCore {
    /// A core over a copy of `keys`. `compression`: a zstd level (0 = none) or `'none'`,
    /// `'zstd'`, `'zstd:N'`, `'lz4'`; `padding`: Padmé buckets; `sign`: sign messages when
    /// an identity is set. Seals with XChaCha20-Poly1305 unless `setSuite` says otherwise.
    #[wasm_bindgen(constructor)]
    pub fn new(
        keys: &Keyring,
        compression: JsValue,
        padding: bool,
        sign: bool,
    ) -> Result<ClientCore, JsValue> {
        let keyring = Arc::new(RwLock::new(keys.build()?));
        let opts = seal_options(self::compression(&compression)?, padding, Suite::default());
        Ok(ClientCore {
            keyring,
            identity: None,
            policy: SealPolicy::new(opts, sign),
            rule_suites: Vec::new(),
            sealer: Sealer::new(),
            opener: Opener::new(),
            relay_auth: None,
            sealing_keys: HashMap::new(),
            sender_names: SenderNames::default(),
            scratch: Vec::new(),
            value: None,
        })
    }

    /// Authenticates to the relay with this account key (`wsp_acct_sk_…`, the file
    /// `whispeer-relay account add NAME --key-out FILE` writes).
    #[wasm_bindgen(js_name = setAccountKey)]
    pub fn set_account_key(&mut self, key: &str) -> Result<(), JsValue> {
        let k = parse_account_key(key).ok_or_else(|| {
            js_error(
                "KEY",
                "not a relay account key: expected wsp_acct_sk_ and 64 hex characters \
                 (from `whispeer-relay account add NAME --key-out FILE`)",
            )
        })?;
        self.relay_auth = Some(AccountAuth::Key(Arc::new(k)));
        Ok(())
    }

    /// Authenticates to the relay with this bearer token.
    #[wasm_bindgen(js_name = setAuthToken)]
    pub fn set_auth_token(&mut self, token: &str) {
        self.relay_auth = Some(AccountAuth::Token(zeroize::Zeroizing::new(
            token.trim().to_owned(),
        )));
    }

    /// Signs with this identity.
    #[wasm_bindgen(js_name = setIdentity)]
    pub fn set_identity(&mut self, identity: &Identity) {
        self.identity = Some(identity.inner.clone());
    }

    /// The default AEAD suite of sealed envelopes: `'xchacha'` or `'aes-gcm'` (every
    /// receiver opens both). Also the suite of every `setTopicOptions` rule naming none,
    /// added before or after.
    #[wasm_bindgen(js_name = setSuite)]
    pub fn set_suite(&mut self, name: &str) -> Result<(), JsValue> {
        let s = suite(name)?;
        self.policy.default.suite = s;
        for ((_, opts), named) in self.policy.per_topic.iter_mut().zip(&self.rule_suites) {
            opts.suite = named.unwrap_or(s);
        }
        Ok(())
    }

    /// Sealing options for topics matching `filter` (first rule added wins); `suite`
    /// absent = the default suite as finally configured (a later `setSuite` reaches this
    /// rule too, as the Rust builder's `TopicOptions`).
    #[wasm_bindgen(js_name = setTopicOptions)]
    pub fn set_topic_options(
        &mut self,
        filter: &str,
        compression: JsValue,
        padding: bool,
        suite: Option<String>,
    ) -> Result<(), JsValue> {
        let f = TopicFilter::new(filter).map_err(topic_error)?;
        let named = suite.map(|s| self::suite(&s)).transpose()?;
        let s = named.unwrap_or(self.policy.default.suite);
        let opts = seal_options(self::compression(&compression)?, padding, s);
        self.policy.per_topic.push((f, opts));
        self.rule_suites.push(named);
        Ok(())
    }

    /// Adds a grant at run time; call `refreshSubscriptions` and send its frames.
    #[wasm_bindgen(js_name = addGrant)]
    pub fn add_grant(&mut self, grant: &Grant) -> Result<(), JsValue> {
        self.keys_mut()
            .add_grant_at(grant.inner.clone(), now_ms())
            .map_err(key_error)
    }

    /// Lets this client seal with the delegated grant(s) for `scope` (`#`, `a/#` or `a/b`)
    /// in tree `treeId` (32 hex digits): a grant narrowed by someone the keyring cannot
    /// verify opens messages but seals only after this opt-in.
    #[wasm_bindgen(js_name = allowSealing)]
    pub fn allow_sealing(&mut self, tree_id: &str, scope: &str) -> Result<(), JsValue> {
        let tree = parse_tree_id(tree_id)?;
        let scope = parse_scope(scope)?;
        self.keys_mut()
            .allow_sealing(tree, &scope)
            .map_err(key_error)
    }

    /// The keyring, to change it: forgets the cached sealing keys. Every write to the
    /// keyring goes through here.
    pub(crate) fn keys_mut(&mut self) -> RwLockWriteGuard<'_, PKeyring> {
        self.sealing_keys.clear();
        self.keyring.write().expect("keyring lock")
    }

    pub(crate) fn seal(
        &mut self,
        tree: Option<String>,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<Envelope, JsValue> {
        let key = sealing_key(&mut self.sealing_keys, &self.keyring, tree, topic)?;
        core::seal_with_key(
            &key,
            self.identity.as_ref(),
            &self.policy,
            &mut self.sealer,
            content_type,
            payload,
            now_ms(),
            &mut Rng,
        )
        .map(|(env, _)| env)
        .map_err(publish_error)
    }

    /// Signing: `batch` (one signature per batch of publishes, PROTOCOL §4.14; the default),
    /// `message` (one per message) or `off` (unsigned).
    #[wasm_bindgen(js_name = setSigning)]
    pub fn set_signing(&mut self, mode: &str) -> Result<(), JsValue> {
        match mode {
            "batch" => {
                self.policy.sign = true;
                self.policy.batch = Some(core::DEFAULT_BATCH);
            }
            "message" => {
                self.policy.sign = true;
                self.policy.batch = None;
            }
            "off" => self.policy.sign = false,
            _ => {
                return Err(js_error(
                    "INVALID_OPTION",
                    &format!(
                        "sign: expected true, false, 'batch', 'message' or 'off' (got {mode:?})"
                    ),
                ))
            }
        }
        Ok(())
    }

    /// Whether publishes are batch-signed (an identity, signing on, in batches).
    pub(crate) fn batches(&self) -> Option<whispeer_protocol::BatchPolicy> {
        self.policy.batches(self.identity.as_ref())
    }

    /// Prepares a publish for its batch signature ([`core::prepare_publish_in`]).
    pub(crate) fn prepare(
        &mut self,
        tree: Option<String>,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<whispeer_protocol::Prepared, JsValue> {
        let key = sealing_key(&mut self.sealing_keys, &self.keyring, tree, topic)?;
        core::prepare_with_key(
            &key,
            &self.policy,
            &mut self.sealer,
            content_type,
            payload,
            now_ms(),
            &mut Rng,
        )
        .map(|(p, _)| p)
        .map_err(publish_error)
    }

    /// Runs one of the engine's seal jobs with this client's identity and sealer.
    pub(crate) fn seal_job(&mut self, job: core::batching::SealJob) -> core::batching::SealDone {
        match &self.identity {
            Some(id) => job.run(id, &mut self.sealer, &mut Rng),
            // The identity went away after the publishes were prepared.
            None => job.fail(whispeer_protocol::SealError::BatchEmpty),
        }
    }

    /// Seals a message to an envelope without framing it (for storage or benchmarks).
    #[wasm_bindgen(js_name = sealEnvelope)]
    pub fn seal_envelope(
        &mut self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<Uint8Array, JsValue> {
        let env = self.seal(None, topic, content_type, payload)?;
        Ok(Uint8Array::from(&env.as_bytes()[..]))
    }

    /// Seals several messages of one topic to envelopes without framing them, signed as
    /// this core signs publishes: batch signing (the default with an identity) puts each
    /// run of up to the batch size under one signature (PROTOCOL §4.14), so a receiver
    /// verifies one signature per run. For storage, and for benchmarks of the default mode.
    #[wasm_bindgen(js_name = sealEnvelopes)]
    pub fn seal_envelopes(
        &mut self,
        topic: &str,
        content_type: &str,
        payloads: Vec<Uint8Array>,
    ) -> Result<Vec<Uint8Array>, JsValue> {
        let out = |e: &Envelope| Uint8Array::from(&e.as_bytes()[..]);
        let (Some(policy), Some(id)) = (self.batches(), self.identity.clone()) else {
            return payloads
                .iter()
                .map(|p| Ok(out(&self.seal(None, topic, content_type, &p.to_vec())?)))
                .collect();
        };
        let mut envs = Vec::with_capacity(payloads.len());
        for run in payloads.chunks(policy.max_messages.clamp(1, 4096) as usize) {
            let prepared = run
                .iter()
                .map(|p| self.prepare(None, topic, content_type, &p.to_vec()))
                .collect::<Result<Vec<_>, _>>()?;
            let sealed = self
                .sealer
                .seal_batch(&prepared, &id, &mut Rng)
                .map_err(|e| publish_error(e.into()))?;
            envs.extend(sealed.iter().map(out));
        }
        Ok(envs)
    }

    fn open_received(&mut self, envelope: Vec<u8>) -> Result<Received, JsValue> {
        // Owned: the bytes JS copied into wasm memory become the envelope, not copied again.
        let env = Envelope::from_bytes(envelope.into())
            .map_err(|e| js_error("DECODE", &format!("invalid envelope: {e}")))?;
        let kr = self.keyring.read().expect("keyring lock");
        let o = self
            .opener
            .open(&kr, &env, now_ms())
            .map_err(|e| js_error("OPEN", &e.to_string()))?;
        Ok(Received::from_opened(o, 0, false))
    }

    /// Opens an envelope (no subscription, no dedup); throws when it does not open. (The
    /// npm package's `openEnvelope` is `openEnvelopeAt` + `readMessage`, js/message.js,
    /// which builds the same object faster.)
    #[wasm_bindgen(js_name = openEnvelopeObject)]
    pub fn open_envelope(&mut self, envelope: Vec<u8>) -> Result<JsValue, JsValue> {
        let r = self.open_received(envelope)?;
        Ok(message_object(&r))
    }

    /// Opens an envelope like `openEnvelopeObject`, writing the message to this core's
    /// scratch buffer in [`layout`]; returns its address in wasm memory, valid until the
    /// next call. A CBOR value is decoded here and kept for `takeValue`.
    #[wasm_bindgen(js_name = openEnvelopeAt)]
    pub fn open_envelope_at(&mut self, envelope: Vec<u8>) -> Result<u32, JsValue> {
        let r = self.open_received(envelope)?;
        Ok(self.stage_message(&r))
    }

    /// Writes `r` to the scratch buffer for `readMessage` (js/message.js) and decodes its
    /// CBOR value for `takeValue`; returns the buffer's address in wasm memory.
    ///
    /// Decoded now, for every delivery, not when `value` is first read: `value` and `error`
    /// stay plain data properties (apps test `error`, spread and post messages), and
    /// `value::decode` scans first, so a delivery costs at most `value::MAX_ITEMS` items.
    pub(crate) fn stage_message(&mut self, r: &Received) -> u32 {
        write_message(r, &mut self.sender_names, &mut self.scratch);
        self.value = whispeer::tag::is_cbor(&r.content_type).then(|| value::decode(&r.payload));
        self.scratch.as_ptr() as u32
    }

    /// The value decoded by the last `openEnvelopeAt` (throws its decoding error).
    #[wasm_bindgen(js_name = takeValue)]
    pub fn take_value(&mut self) -> Result<JsValue, JsValue> {
        self.value.take().unwrap_or(Ok(JsValue::UNDEFINED))
    }
}
