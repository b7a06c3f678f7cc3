//! The sans-IO client the JS `Client` drives: it wraps the Rust client core
//! (`whispeer::core`) and turns frames into bytes and events. JS owns only the WebSocket,
//! the timers and the callbacks.

use std::sync::{Arc, RwLock};

use js_sys::{Array, Object, Reflect, Uint8Array};
use rand_core::RngCore;

use crate::rng::Rng;
use wasm_bindgen::prelude::*;
use whispeer::core::connection::AccountAuth;
use whispeer::core::{self, ClientCore as Core, Received, SealPolicy};
use whispeer_protocol::frame::{Close, Ping, Pong, Unsub};
use whispeer_protocol::{
    Compression, Envelope, ErrorCode, Frame, Keyring as PKeyring, Opener, Padding, Provenance, Qos,
    Scope, SealOptions, Sealer, Topic, TopicFilter, TreeId,
};

use crate::error::{js_error, key_error, publish_error, subscribe_error, topic_error};
use crate::keys::{Grant, Identity, Keyring};
use crate::{now_ms, value};

pub(crate) fn set(o: &Object, k: &str, v: impl Into<JsValue>) {
    let _ = Reflect::set(o, &JsValue::from_str(k), &v.into());
}

pub(crate) fn bytes(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

fn frames(fs: &[Frame]) -> Array {
    fs.iter().map(|f| bytes(&f.to_bytes())).collect()
}

fn seal_options(level: i32, padding: bool) -> SealOptions {
    SealOptions {
        compression: if level <= 0 {
            Compression::None
        } else {
            Compression::Zstd(level.min(22))
        },
        padding: if padding {
            Padding::Padme
        } else {
            Padding::None
        },
    }
}

/// A grant's provenance as a JS object: `{ kind: "admin-signed" }`,
/// `{ kind: "derived", from: SCOPE }` or `{ kind: "delegated", by: SENDER_ID }`.
fn provenance_object(p: &Provenance) -> JsValue {
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
fn parse_tree_id(s: &str) -> Result<TreeId, JsValue> {
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

/// A delivered message as a JS object (`value` decoded when the content type is CBOR).
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
    set(&o, "id", hex::encode(&r.msg_id.0));
    set(&o, "timestamp", r.ts_ms as f64);
    set(&o, "seq", r.seq as f64);
    set(&o, "retained", r.retained);
    set(&o, "treeId", hex::encode(&r.tree_id.0));
    set(&o, "epoch", r.epoch as f64);
    set(&o, "provenance", provenance_object(&r.provenance));
    set(&o, "contentType", r.content_type.as_str());
    set(&o, "payload", bytes(&r.payload));
    if r.content_type == core::CBOR {
        match value::decode(&r.payload) {
            Ok(v) => set(&o, "value", v),
            Err(e) => set(&o, "error", e),
        }
    }
    o.into()
}

/// The message counters as a JS object.
pub(crate) fn core_stats_object(s: &core::CoreStats) -> Object {
    let o = Object::new();
    set(&o, "delivered", s.delivered as f64);
    set(&o, "rejected", s.rejected as f64);
    set(&o, "duplicates", s.duplicates as f64);
    set(&o, "relayGaps", s.relay_gaps as f64);
    let r = Object::new();
    set(&r, "beforeHorizon", s.refused.before_horizon as f64);
    set(&r, "future", s.refused.future as f64);
    set(&r, "staleLive", s.refused.stale_live as f64);
    set(&r, "retainedRollback", s.refused.retained_rollback as f64);
    set(&r, "unsigned", s.refused.unsigned as f64);
    set(&r, "unlistedSender", s.refused.unlisted_sender as f64);
    set(&o, "refused", r);
    o
}

/// The low-level client: keys, subscriptions, sealing and opening, frame encoding. Not
/// connected to anything; `Client` (JS) moves its bytes over a WebSocket.
#[wasm_bindgen]
#[derive(Debug)]
pub struct ClientCore {
    pub(crate) core: Core,
    pub(crate) keyring: Arc<RwLock<PKeyring>>,
    pub(crate) identity: Option<whispeer_protocol::Identity>,
    policy: SealPolicy,
    sealer: Sealer,
    opener: Opener,
    /// Relay account: an Ed25519 key (answers `Challenge`) or a bearer token (never the
    /// identity that signs messages).
    pub(crate) relay_auth: Option<AccountAuth>,
}

/// Prefix of a relay account key (`whispeer-relay account add NAME --key-out FILE`).
const ACCOUNT_KEY_PREFIX: &str = "wsp_acct_sk_";

fn parse_account_key(text: &str) -> Option<ed25519_dalek::SigningKey> {
    let h = text.trim().strip_prefix(ACCOUNT_KEY_PREFIX)?;
    if h.len() != 64 || !h.is_ascii() {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    seed.iter_mut().for_each(|b| *b = 0);
    Some(key)
}

#[wasm_bindgen]
impl ClientCore {
    /// A core over a copy of `keys`. `compression`: zstd level (0 = none); `padding`:
    /// Padmé buckets; `sign`: sign messages when an identity is set.
    #[wasm_bindgen(constructor)]
    pub fn new(
        keys: &Keyring,
        compression: i32,
        padding: bool,
        sign: bool,
    ) -> Result<ClientCore, JsValue> {
        let keyring = Arc::new(RwLock::new(keys.build()?));
        Ok(ClientCore {
            core: Core::new(keyring.clone()),
            keyring,
            identity: None,
            policy: SealPolicy {
                default: seal_options(compression, padding),
                per_topic: Vec::new(),
                sign,
            },
            sealer: Sealer::new(),
            opener: Opener::new(),
            relay_auth: None,
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

    /// Sealing options for topics matching `filter` (first rule added wins).
    #[wasm_bindgen(js_name = setTopicOptions)]
    pub fn set_topic_options(
        &mut self,
        filter: &str,
        compression: i32,
        padding: bool,
    ) -> Result<(), JsValue> {
        let f = TopicFilter::new(filter).map_err(topic_error)?;
        self.policy
            .per_topic
            .push((f, seal_options(compression, padding)));
        Ok(())
    }

    /// Adds a grant at run time; call `refreshSubscriptions` and send its frames.
    #[wasm_bindgen(js_name = addGrant)]
    pub fn add_grant(&mut self, grant: &Grant) -> Result<(), JsValue> {
        self.keyring
            .write()
            .expect("keyring lock")
            .add_grant(grant.inner.clone(), now_ms())
            .map_err(key_error)
    }

    /// The first frame of a connection.
    pub fn hello(&self, name: &str) -> Uint8Array {
        let mut hello = Core::hello(name);
        if let (Frame::Hello(h), Some(a)) = (&mut hello, &self.relay_auth) {
            a.fill_hello(h);
        }
        Uint8Array::from(&hello.to_bytes()[..])
    }

    /// Lets this client seal with the delegated grant(s) for `scope` (`#`, `a/#` or `a/b`)
    /// in tree `treeId` (32 hex digits): a grant narrowed by someone the keyring cannot
    /// verify opens messages but seals only after this opt-in.
    #[wasm_bindgen(js_name = allowSealing)]
    pub fn allow_sealing(&mut self, tree_id: &str, scope: &str) -> Result<(), JsValue> {
        let tree = parse_tree_id(tree_id)?;
        let scope = parse_scope(scope)?;
        self.keyring
            .write()
            .expect("keyring lock")
            .allow_sealing(tree, &scope)
            .map_err(key_error)
    }

    pub(crate) fn seal(
        &mut self,
        tree: Option<String>,
        topic: &str,
        content_type: &str,
        payload: &[u8],
    ) -> Result<Envelope, JsValue> {
        let tree = tree.as_deref().map(parse_tree_id).transpose()?;
        let topic = Topic::new(topic).map_err(topic_error)?;
        core::seal_publish_in(
            &self.keyring,
            tree,
            self.identity.as_ref(),
            &self.policy,
            &mut self.sealer,
            &topic,
            content_type,
            payload,
            now_ms(),
            &mut Rng,
        )
        .map(|(env, _)| env)
        .map_err(publish_error)
    }

    fn pub_bytes(&mut self, env: Envelope, retain: bool, ack: bool) -> Array {
        let pid = ack.then(|| {
            let mut id = [0u8; 16];
            Rng.fill_bytes(&mut id);
            id
        });
        let f = core::pub_frame(env, pid, retain, Qos::AtMostOnce).to_bytes();
        let out = Array::new();
        out.push(&bytes(&f));
        if let Some(id) = pid {
            out.push(&JsValue::from_str(&hex::encode(&id)));
        }
        out
    }

    /// A `Pub` frame for a JS value (CBOR). Returns `[frame]`, or `[frame, publishId]` when
    /// `ack` asks the relay to confirm. `tree` (32 hex digits) names the tree whose key
    /// seals it (needed when two trees cover the topic).
    pub fn publish(
        &mut self,
        topic: &str,
        value: &JsValue,
        retain: bool,
        ack: bool,
        tree: Option<String>,
    ) -> Result<Array, JsValue> {
        let payload = value::encode(value)?;
        let env = self.seal(tree, topic, core::CBOR, &payload)?;
        Ok(self.pub_bytes(env, retain, ack))
    }

    /// A `Pub` frame for raw bytes with a content type.
    #[wasm_bindgen(js_name = publishBytes)]
    pub fn publish_bytes(
        &mut self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
        retain: bool,
        ack: bool,
        tree: Option<String>,
    ) -> Result<Array, JsValue> {
        let env = self.seal(tree, topic, content_type, payload)?;
        Ok(self.pub_bytes(env, retain, ack))
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

    /// Opens an envelope (no subscription, no dedup); throws when it does not open.
    #[wasm_bindgen(js_name = openEnvelope)]
    pub fn open_envelope(&mut self, envelope: &[u8]) -> Result<JsValue, JsValue> {
        let env = Envelope::from_slice(envelope)
            .map_err(|e| js_error("DECODE", &format!("invalid envelope: {e}")))?;
        let kr = self.keyring.read().expect("keyring lock");
        let o = self
            .opener
            .open(&kr, &env, now_ms())
            .map_err(|e| js_error("OPEN", &e.to_string()))?;
        let r = Received {
            topic: o.topic,
            sender: o.sender,
            msg_id: o.msg_id,
            ts_ms: o.ts_ms,
            seq: 0,
            content_type: o.content_type,
            payload: o.payload.into(),
            retained: false,
            tree_id: o.tree_id,
            epoch: o.epoch,
            provenance: o.provenance,
        };
        Ok(message_object(&r))
    }

    /// Registers local subscription `id` on `filter`; returns the `Sub` frames to send.
    pub fn subscribe(&mut self, id: f64, filter: &str) -> Result<Array, JsValue> {
        let f = TopicFilter::new(filter).map_err(topic_error)?;
        let fs = self
            .core
            .subscribe(id as u64, f, Qos::AtMostOnce, now_ms())
            .map_err(subscribe_error)?;
        Ok(frames(&fs))
    }

    /// The relay subscription ids of local subscription `id` (each is confirmed by a
    /// `subok` event).
    #[wasm_bindgen(js_name = relayIds)]
    pub fn relay_ids(&self, id: f64) -> Vec<f64> {
        self.core
            .relay_ids(id as u64)
            .iter()
            .map(|r| *r as f64)
            .collect()
    }

    /// Drops local subscription `id`; returns the `Unsub` frames.
    pub fn unsubscribe(&mut self, id: f64) -> Array {
        frames(&self.core.unsubscribe(id as u64))
    }

    /// After a reconnect: `Sub` frames for every subscription.
    #[wasm_bindgen(js_name = resubscribeAll)]
    pub fn resubscribe_all(&mut self) -> Array {
        frames(&self.core.resubscribe_all(now_ms()))
    }

    /// After a key change on a live connection: `Unsub` for the old relay subscriptions,
    /// then `Sub` frames recompiled against the keyring as it is now.
    #[wasm_bindgen(js_name = refreshSubscriptions)]
    pub fn refresh_subscriptions(&mut self, local_ids: Vec<f64>) -> Array {
        let mut out: Vec<Frame> = Vec::new();
        for id in local_ids {
            out.extend(
                self.core
                    .relay_ids(id as u64)
                    .iter()
                    .map(|r| Frame::Unsub(Unsub { sub_id: *r })),
            );
        }
        out.extend(self.core.resubscribe_all(now_ms()));
        frames(&out)
    }

    /// A `Ping` frame.
    pub fn ping(&self, nonce: f64) -> Uint8Array {
        Uint8Array::from(
            &Frame::Ping(Ping {
                nonce: nonce as u64,
            })
            .to_bytes()[..],
        )
    }

    /// A `Close` frame.
    #[wasm_bindgen(js_name = closeFrame)]
    pub fn close_frame(&self) -> Uint8Array {
        Uint8Array::from(
            &Frame::Close(Close {
                code: ErrorCode::Other(0),
                message: "client closing".into(),
            })
            .to_bytes()[..],
        )
    }

    /// Counters: `{delivered, rejected, duplicates, relayGaps, refused: {beforeHorizon,
    /// future, staleLive, retainedRollback, unsigned, unlistedSender}}`.
    pub fn stats(&self) -> JsValue {
        core_stats_object(&self.core.stats()).into()
    }

    /// Handles one frame from the relay and returns an event object (`type` is one of
    /// `welcome`, `message`, `dropped`, `subok`, `puback`, `pong`, `ping`, `gap`, `error`,
    /// `close`, `ignored`). Throws on bytes that are not a frame.
    pub fn handle(&mut self, frame: &[u8]) -> Result<JsValue, JsValue> {
        let f = Frame::decode_slice(frame)
            .map_err(|e| js_error("PROTOCOL", &format!("bad frame from relay: {e}")))?;
        let o = Object::new();
        match f {
            Frame::Welcome(w) => {
                set(&o, "type", "welcome");
                set(&o, "heartbeatMs", w.heartbeat_ms as f64);
                set(&o, "maxFrame", w.max_frame as f64);
            }
            Frame::Msg(m) => match self.core.receive(&m, now_ms()) {
                Some((r, targets)) => {
                    set(&o, "type", "message");
                    let subs: Array = targets.iter().map(|t| JsValue::from(*t as f64)).collect();
                    set(&o, "subs", subs);
                    set(&o, "message", message_object(&r));
                }
                None => set(&o, "type", "dropped"),
            },
            Frame::SubOk(ok) => {
                set(&o, "type", "subok");
                set(&o, "relayId", ok.sub_id as f64);
                if let Some(local) = self.core.local_for(ok.sub_id) {
                    set(&o, "sub", local as f64);
                }
            }
            Frame::PubAck(a) => {
                set(&o, "type", "puback");
                set(&o, "publishId", hex::encode(&a.publish_id));
                set(&o, "seq", a.seq as f64);
            }
            Frame::Pong(p) => {
                set(&o, "type", "pong");
                set(&o, "nonce", p.nonce as f64);
            }
            Frame::Ping(p) => {
                set(&o, "type", "ping");
                set(
                    &o,
                    "reply",
                    bytes(&Frame::Pong(Pong { nonce: p.nonce }).to_bytes()),
                );
            }
            Frame::Gap(g) => {
                self.core.on_gap(g.dropped);
                set(&o, "type", "gap");
                set(&o, "dropped", g.dropped as f64);
            }
            Frame::Err(e) => {
                set(&o, "type", "error");
                set(&o, "code", e.code.name());
                set(&o, "message", e.message.as_str());
                set(&o, "fatal", e.fatal);
                if let Some(pid) = e.publish_id {
                    set(&o, "publishId", hex::encode(&pid));
                }
                if let Some(local) = e.sub_id.and_then(|s| self.core.local_for(s)) {
                    set(&o, "sub", local as f64);
                }
            }
            Frame::Challenge(c) => {
                match self.relay_auth.as_ref().and_then(|a| a.answer(&c.nonce)) {
                    Some(auth) => {
                        set(&o, "type", "challenge");
                        set(&o, "reply", bytes(&Frame::Auth(auth).to_bytes()));
                    }
                    None => {
                        return Err(js_error(
                            "PROTOCOL",
                            "the relay sent a Challenge but no account key is set",
                        ))
                    }
                }
            }
            Frame::Close(c) => {
                set(&o, "type", "close");
                set(&o, "code", c.code.name());
                set(&o, "message", c.message.as_str());
            }
            other => {
                set(&o, "type", "ignored");
                set(&o, "frame", other.name());
            }
        }
        Ok(o.into())
    }
}
