//! The connection engine (`whispeer::core::connection::Engine`) for JS: the whole client
//! side of the relay protocol — handshake, subscriptions and resume positions, the QoS 1/2
//! outbox with its publish ids, acks, replay, durable subscriptions, heartbeats, backoff
//! and flush. The JS `Client` only opens WebSockets, moves their bytes and runs one timer
//! (`../shared/ENGINE.md` §3); sealing stays here (a `ClientCore` moved in at construction).
//!
//! Every input takes the time: `monoMs` (`performance.now()`, deadlines) and `unixMs`
//! (`Date.now()`, key epochs and replay). After each input or command the driver drains
//! `pollTransmit`, then `pollTimeout`, then `pollEvent`.

use std::collections::BTreeMap;

use bytes::Bytes;
use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use whispeer::core::connection::{
    AckToken, Backoff, Engine as Inner, EngineConfig, Event as E, Now, PubOptions, PublishFailure,
    PublishId, Transmit,
};
use whispeer::core::connection::{MAX_HEARTBEAT_MS, MIN_HEARTBEAT_MS};
use whispeer::core::receive::{Change, SenderPolicy};
use whispeer::core::{self, SubscribeOptions};
use whispeer_protocol::frame::Replay;
use whispeer_protocol::{Qos, SenderId, TopicFilter};

use crate::client::{set, ClientCore};
use crate::error::{js_error, key_error, publish_error, subscribe_error, topic_error};
use crate::keys::Grant;
use crate::persist;
use crate::value;

fn now(mono_ms: f64, unix_ms: f64) -> Now {
    Now::new(mono_ms.max(0.0) as u64, unix_ms.max(0.0) as u64)
}

fn get(o: &JsValue, k: &str) -> Option<JsValue> {
    if !o.is_object() {
        return None;
    }
    Reflect::get(o, &JsValue::from_str(k))
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_null())
}

fn bad_option(what: &str, v: &JsValue) -> JsValue {
    js_error(
        "INVALID_OPTION",
        &format!(
            "{what}, got {}",
            String::from(js_sys::JSON::stringify(v).unwrap_or_else(|_| "?".into()))
        ),
    )
}

/// A whole number ≥ 0 option (`Infinity` → `None` where allowed by the caller).
fn count(o: &JsValue, k: &str) -> Result<Option<f64>, JsValue> {
    match get(o, k) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n >= 0.0 && (n.fract() == 0.0 || n.is_infinite()) => Ok(Some(n)),
            _ => Err(bad_option(&format!("{k}: expected a whole number ≥ 0"), &v)),
        },
    }
}

fn flag(o: &JsValue, k: &str) -> Result<Option<bool>, JsValue> {
    match get(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad_option(&format!("{k}: expected true or false"), &v)),
    }
}

/// `relayNames`: an array of the relay name (a string, or `null` for none) of each URL, in
/// the order of the URLs. A name that is not canonical counts as none (the engine checks).
fn relay_names(o: &JsValue) -> Result<Vec<Option<String>>, JsValue> {
    let Some(v) = get(o, "relayNames") else {
        return Ok(Vec::new());
    };
    let a = v
        .dyn_into::<Array>()
        .map_err(|v| bad_option("relayNames: expected an array", &v))?;
    a.iter()
        .map(|n| {
            if n.is_null() || n.is_undefined() {
                Ok(None)
            } else {
                n.as_string()
                    .map(Some)
                    .ok_or_else(|| bad_option("relayNames: expected strings or null", &n))
            }
        })
        .collect()
}

/// `heartbeatMs`: a whole number of milliseconds within the range the engine takes from a
/// relay's `Welcome` (1 s to 5 min, `MIN_HEARTBEAT_MS..=MAX_HEARTBEAT_MS`). 0 would ping
/// without pause, `Infinity` never: a dead connection would go unnoticed.
fn heartbeat_ms(o: &JsValue) -> Result<Option<u64>, JsValue> {
    let Some(v) = get(o, "heartbeatMs") else {
        return Ok(None);
    };
    match v.as_f64() {
        Some(n)
            if n.fract() == 0.0 && n >= MIN_HEARTBEAT_MS as f64 && n <= MAX_HEARTBEAT_MS as f64 =>
        {
            Ok(Some(n as u64))
        }
        _ => Err(bad_option(
            &format!(
                "heartbeatMs: expected a whole number of milliseconds from {MIN_HEARTBEAT_MS} \
                 to {MAX_HEARTBEAT_MS}"
            ),
            &v,
        )),
    }
}

/// The publisher policies of `options.topics`: for each filter whose rule has
/// `requireSigned: true` or an `allowSenders` list (sender ids, `wspk1…`), a
/// [`SenderPolicy`]. Every rule whose filter matches a topic applies (unlike sealing rules).
fn publisher_policies(o: &JsValue) -> Result<Vec<(TopicFilter, SenderPolicy)>, JsValue> {
    let Some(topics) = get(o, "topics") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in Object::entries(&Object::from(topics)).iter() {
        let entry = Array::from(&entry);
        let filter = entry.get(0).as_string().unwrap_or_default();
        let rule = entry.get(1);
        let what = |k: &str| format!("topics[{filter:?}].{k}");
        let mut p = SenderPolicy::new();
        let mut any = false;
        if let Some(v) = get(&rule, "requireSigned") {
            match v.as_bool() {
                Some(true) => {
                    p = p.require_signed();
                    any = true;
                }
                Some(false) => {}
                None => {
                    return Err(bad_option(
                        &format!("{}: expected true or false", what("requireSigned")),
                        &v,
                    ))
                }
            }
        }
        if let Some(v) = get(&rule, "allowSenders") {
            let expected = || {
                bad_option(
                    &format!(
                        "{}: expected an array of sender ids (wspk1…)",
                        what("allowSenders")
                    ),
                    &v,
                )
            };
            if !Array::is_array(&v) {
                return Err(expected());
            }
            let mut senders = Vec::new();
            for s in Array::from(&v).iter() {
                let text = s.as_string().ok_or_else(expected)?;
                let id: SenderId = text.trim().parse().map_err(|e| {
                    js_error(
                        "INVALID_OPTION",
                        &format!(
                            "{}: not a sender id (wspk1…): {text:?}: {e}",
                            what("allowSenders")
                        ),
                    )
                })?;
                senders.push(id);
            }
            // An empty list accepts no one (signed or not): as the Rust builder's.
            p = p.allow_senders(senders);
            any = true;
        }
        if any {
            out.push((TopicFilter::new(&filter).map_err(topic_error)?, p));
        }
    }
    Ok(out)
}

fn qos(o: &JsValue) -> Result<Qos, JsValue> {
    match count(o, "qos")? {
        None => Ok(Qos::AtMostOnce),
        Some(n) if n <= 2.0 => Ok(Qos::from_u64(n as u64).unwrap_or(Qos::AtMostOnce)),
        Some(_) => Err(bad_option(
            "qos: expected 0, 1 or 2",
            &get(o, "qos").unwrap_or_default(),
        )),
    }
}

fn pid_hex(p: &PublishId) -> String {
    hex::encode(p.0)
}

/// The connection engine. See the module documentation.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Engine {
    eng: Inner,
    core: ClientCore,
    /// Ack tokens handed to JS (as numbers) and not yet taken.
    tokens: BTreeMap<u64, AckToken>,
    next_token: u64,
    /// With persistence (`options.state` given): the records not yet taken by
    /// `takeChanges`, and the kept publishes (for snapshots; `Bytes` shared with the outbox).
    saving: Option<Saving>,
    /// Batch signing (PROTOCOL §4.14): the engine queues prepared publishes and cuts seal
    /// jobs; this glue runs them inline before the next frame leaves (`pollTransmit`), so
    /// a synchronous run of publishes shares one signature. The time of the latest publish
    /// (the engine's clock only moves forward, so running the jobs with it is exact enough).
    seal_now: Now,
}

#[derive(Debug, Default)]
struct Saving {
    journal: Vec<u8>,
    kept: BTreeMap<[u8; 16], (u64, Bytes)>,
    /// Saved kept publishes the loader skipped (`persist::Saved::refused_kept`).
    refused_kept: usize,
    /// Bytes at the end of the loaded log that were no whole record (`persist::Saved::torn`).
    torn: usize,
    /// Every message saved as owed to a durable, kept up to date with the engine's owed
    /// changes: what a snapshot writes. The engine holds at most its bound of them (65,536)
    /// in memory; the rest stay saved for a later process, as rows of the Rust client's
    /// file do — a snapshot of only the engine's dropped them at the next compaction, and
    /// their redelivery to the durable was refused as a duplicate in every later run.
    owed: persist::OwedRows,
}

#[wasm_bindgen]
impl Engine {
    /// An engine sealing with `core` (moved in: its keys, identity, topic options and
    /// relay account) and configured by `options` (`name`, `relays` (how many URLs),
    /// `relayNames` (each URL's relay name, `host:port`), `requireBoundAuth`,
    /// `connectTimeoutMs`, `reconnect:
    /// { initialDelayMs, maxDelayMs, maxAttempts }`, `retryFirstConnect`,
    /// `reconnectBuffer`, `keptBytes`, `subscriptionCapacity`, `heartbeatMs`, `state`).
    /// `seed`: 32 random bytes (`crypto.getRandomValues`) for publish ids and backoff
    /// jitter. The first `pollTransmit` asks for a socket.
    ///
    /// `state` (a `Uint8Array`, empty for a new one) turns persistence on: the saved state
    /// (`snapshot` and `takeChanges` bytes, concatenated) is imported first — the kept
    /// publishes are re-sent first with their ids, the dedup window, retained high-water
    /// marks and pinned admins hold again — and every change is recorded for `takeChanges`.
    /// A foreign or corrupt state throws `STATE`; pins that contradict the keys, `KEY`.
    #[wasm_bindgen(constructor)]
    pub fn new(
        mut core: ClientCore,
        options: &JsValue,
        seed: &[u8],
        mono_ms: f64,
        unix_ms: f64,
    ) -> Result<Engine, JsValue> {
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| js_error("INVALID_OPTION", "seed: expected 32 random bytes"))?;
        let mut cfg = EngineConfig::default();
        if let Some(n) = get(options, "name").and_then(|v| v.as_string()) {
            cfg.client_name = n;
        }
        cfg.auth = core.relay_auth.clone();
        let ms = |k: &str, d: u64| -> Result<u64, JsValue> {
            Ok(count(options, k)?.map_or(d, |n| n.min(u64::MAX as f64) as u64))
        };
        cfg.connect_timeout_ms = ms("connectTimeoutMs", cfg.connect_timeout_ms)?;
        cfg.offline_bytes = ms("reconnectBuffer", cfg.offline_bytes as u64)? as usize;
        cfg.kept_bytes = ms("keptBytes", cfg.kept_bytes as u64)? as usize;
        cfg.sub_capacity = ms("subscriptionCapacity", cfg.sub_capacity)?.max(1);
        // Receiver limits, as the Rust builder's `max_payload` and `dedup_capacity`.
        cfg.receive.max_payload =
            ms("maxPayload", cfg.receive.max_payload as u64)?.min(usize::MAX as u64) as usize;
        cfg.receive.max_entries = ms("dedupCapacity", cfg.receive.max_entries as u64)?
            .clamp(1, usize::MAX as u64) as usize;
        cfg.default_heartbeat_ms = heartbeat_ms(options)?.unwrap_or(cfg.default_heartbeat_ms);
        // Publisher policies (`topics[filter].requireSigned` / `.allowSenders`), as the Rust
        // builder's `TopicOptions::require_signed` / `allow_senders`.
        cfg.receive.policies = publisher_policies(options)?;
        cfg.retry_first_connect = flag(options, "retryFirstConnect")?.unwrap_or(false);
        // How many relay URLs the driver has: the engine goes round them (`dial.relay`).
        cfg.relays = count(options, "relays")?.map_or(1, |n| n.clamp(1.0, 1024.0) as usize);
        // Their relay names (`host:port`, from the URL parser: PROTOCOL §3.5.6), what a
        // relay-bound sign-in signs on a connection to each; `requireBoundAuth`: sign only
        // those.
        cfg.relay_names = relay_names(options)?;
        cfg.require_bound_auth = flag(options, "requireBoundAuth")?.unwrap_or(false);
        if let Some(r) = get(options, "reconnect") {
            let d = Backoff::default();
            let max_attempts = match count(&r, "maxAttempts")? {
                None => d.max_attempts,
                Some(n) if n.is_infinite() => None,
                Some(n) => Some(n.min(u32::MAX as f64) as u32),
            };
            let initial = count(&r, "initialDelayMs")?.map_or(d.initial_ms, |n| n as u64);
            let max = count(&r, "maxDelayMs")?.map_or(d.max_ms, |n| n as u64);
            cfg.backoff = Backoff::new(initial, max.max(initial), max_attempts);
        }
        // Durable owner secrets from the identity: a client with the same identity resumes
        // its durable subscriptions (else random for this engine's lifetime).
        cfg.owner_key = Some(match &core.identity {
            Some(i) => i.derive_secret("whispeer v2 durable owner"),
            None => {
                let mut k = zeroize::Zeroizing::new([0u8; 32]);
                rand_core::RngCore::fill_bytes(&mut crate::rng::Rng, &mut k[..]);
                k
            }
        });
        let n = now(mono_ms, unix_ms);
        let mut saved = None;
        if let Some(v) = get(options, "state") {
            let bytes = v
                .dyn_into::<Uint8Array>()
                .map_err(|v| bad_option("state: expected a Uint8Array", &v))?
                .to_vec();
            let s =
                persist::load(&bytes, n.unix_ms).map_err(|e| js_error("STATE", &e.to_string()))?;
            if let Some(p) = &s.pins {
                core.keys_mut().import_pins(p).map_err(key_error)?;
            }
            // When epochs were superseded in earlier runs (the keys were added now: without
            // this the previous epoch's grace restarted at every start); a time later than
            // now — the clock went back — counts as the grace over.
            for (&(tree, epoch), &at) in &s.superseded {
                core.keys_mut()
                    .restore_superseded(tree, epoch, at, n.unix_ms);
            }
            // (The engine's outbox orders them by their saved order.)
            cfg.restored = s
                .outbox
                .iter()
                .map(|(pid, (order, frame))| (PublishId(*pid), *order, frame.clone()))
                .collect();
            saved = Some(s);
        }
        let mut eng = Inner::new(cfg, core.keyring.clone(), seed, n);
        let saving = saved.map(|s| {
            let g = eng.core_mut().guard_mut();
            for (k, exp) in s.seen {
                g.restore_seen(k, exp, n.unix_ms);
            }
            for (d, exp) in s.seen_digests {
                g.restore_digest(d, exp, n.unix_ms);
            }
            for (k, ts, id) in s.retained {
                g.restore_retained(k, ts, id);
            }
            g.restore_forgot_upto(s.forgot_upto);
            // After the window: an owed message is kept only while it remembers it (the
            // next snapshot leaves out the ones that were not kept); one past the engine's
            // bound stays saved (`Saving::owed`), as in the Rust client's file.
            let c = eng.core_mut();
            let mut owed = s.owed;
            owed.0.retain(|name, ds| {
                ds.retain(|d| c.restore_owed(name, *d));
                !ds.is_empty()
            });
            Saving {
                journal: Vec::new(),
                kept: s.outbox,
                refused_kept: s.refused_kept,
                torn: s.torn,
                owed,
            }
        });
        Ok(Engine {
            eng,
            core,
            tokens: BTreeMap::new(),
            next_token: 1,
            saving,
            seal_now: n,
        })
    }

    // ---- inputs ------------------------------------------------------------------------

    /// Socket `conn` is open.
    #[wasm_bindgen(js_name = handleConnected)]
    pub fn handle_connected(&mut self, conn: f64, mono_ms: f64, unix_ms: f64) {
        self.eng
            .handle_connected(conn as u64, now(mono_ms, unix_ms));
    }

    /// One binary WebSocket message (one frame) from socket `conn`.
    #[wasm_bindgen(js_name = handleFrame)]
    pub fn handle_frame(&mut self, conn: f64, frame: &[u8], mono_ms: f64, unix_ms: f64) {
        let b = Bytes::copy_from_slice(frame);
        self.eng
            .handle_frame(conn as u64, &b, now(mono_ms, unix_ms));
    }

    /// Socket `conn` closed or failed (or could not be opened).
    #[wasm_bindgen(js_name = handleDisconnected)]
    pub fn handle_disconnected(&mut self, conn: f64, why: &str, mono_ms: f64, unix_ms: f64) {
        self.eng
            .handle_disconnected(conn as u64, why, now(mono_ms, unix_ms));
    }

    /// The timer fired (an early or repeated call does nothing).
    #[wasm_bindgen(js_name = handleTimeout)]
    pub fn handle_timeout(&mut self, mono_ms: f64, unix_ms: f64) {
        self.eng.handle_timeout(now(mono_ms, unix_ms));
    }

    // ---- commands ----------------------------------------------------------------------

    /// Seals `value` (CBOR) for `topic` and publishes it. `options`: `qos` (0, 1, 2),
    /// `retain`, `ack`, `tree` (32 hex digits). Returns the publish id (hex) when a `puback`
    /// or `publishFailed` event follows (QoS ≥ 1, or `ack`), else `undefined`.
    pub fn publish(
        &mut self,
        topic: &str,
        value: &JsValue,
        options: &JsValue,
        mono_ms: f64,
        unix_ms: f64,
    ) -> Result<Option<String>, JsValue> {
        let payload = value::encode(value)?;
        self.publish_payload(topic, core::CBOR, &payload, options, now(mono_ms, unix_ms))
    }

    /// Like `publish`, for raw bytes with a content type.
    #[wasm_bindgen(js_name = publishBytes)]
    pub fn publish_bytes(
        &mut self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
        options: &JsValue,
        mono_ms: f64,
        unix_ms: f64,
    ) -> Result<Option<String>, JsValue> {
        self.publish_payload(topic, content_type, payload, options, now(mono_ms, unix_ms))
    }

    /// Subscribes local subscription `id` to `filter`. `options`: `qos` (0, 1, 2), `replay`
    /// (`{ fromSeq }`, `{ sinceMs }` or `{ last }`), `durable` (a name), `retained`
    /// (default true), `olderHistory`, `capacity` (messages delivered and not yet taken;
    /// default the client's), `tree` (32 hex digits: the one tree whose messages it gets;
    /// without it, the one tree whose grants overlap the filter). Throws `NO_KEY`,
    /// `INVALID_TOPIC`, `INVALID_TREE` or `KEY` (grants of several trees overlap the filter
    /// and no `tree` is named) at once; a `subscribed` or `subscribeFailed` event follows.
    pub fn subscribe(
        &mut self,
        id: f64,
        filter: &str,
        options: &JsValue,
        mono_ms: f64,
        unix_ms: f64,
    ) -> Result<(), JsValue> {
        let f = TopicFilter::new(filter).map_err(topic_error)?;
        let mut o = SubscribeOptions::new().qos(qos(options)?);
        if let Some(r) = get(options, "replay") {
            let keys = [("fromSeq", 0), ("sinceMs", 1), ("last", 2)];
            let mut chosen = None;
            for (k, kind) in keys {
                if let Some(n) = count(&r, k)? {
                    if chosen.is_some() {
                        return Err(bad_option(
                            "replay: expected one of fromSeq, sinceMs, last",
                            &r,
                        ));
                    }
                    let n = n as u64;
                    chosen = Some(match kind {
                        0 => Replay::FromSeq(n),
                        1 => Replay::SinceMs(n),
                        _ => Replay::LastN(n),
                    });
                }
            }
            let replay = chosen.ok_or_else(|| {
                bad_option("replay: expected { fromSeq }, { sinceMs } or { last }", &r)
            })?;
            o = o.replay(replay);
        }
        if let Some(d) = get(options, "durable") {
            let name = d
                .as_string()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad_option("durable: expected a non-empty name", &d))?;
            o = o.durable(name);
        }
        if let Some(r) = flag(options, "retained")? {
            o = o.retained(r);
        }
        if let Some(h) = flag(options, "olderHistory")? {
            o = o.older_history(h);
        }
        if let Some(c) = count(options, "capacity")? {
            if c < 1.0 {
                return Err(bad_option(
                    "capacity: expected a whole number ≥ 1",
                    &JsValue::from(c),
                ));
            }
            o = o.capacity(if c.is_finite() { c as u64 } else { u64::MAX });
        }
        if let Some(t) = tree_option(options)? {
            o = o.tree(crate::client::parse_tree_id(&t)?);
        }
        self.eng
            .subscribe(id as u64, f, o, now(mono_ms, unix_ms))
            .map_err(subscribe_error)
    }

    /// Drops local subscription `id` (what it never took is not acked: the relay delivers
    /// it again to a later subscription).
    pub fn unsubscribe(&mut self, id: f64) {
        let id = id as u64;
        self.eng.unsubscribe(id);
        self.tokens.retain(|_, t| t.sub() != id);
    }

    /// Ends durable subscription `id` and asks the relay to delete its durable (name,
    /// position, owner; PROTOCOL §3.3.4); a `durableDeleted` event (with `error` when the
    /// relay refused) or `flushFailed` with the returned id follows. Throws, sending
    /// nothing and keeping the subscription, with `DISCONNECTED` (not connected),
    /// `UNSUPPORTED` (the relay did not grant `DURABLE_DELETE`) or `NOT_DURABLE`.
    #[wasm_bindgen(js_name = deleteDurable)]
    pub fn delete_durable(&mut self, id: f64, mono_ms: f64, unix_ms: f64) -> Result<f64, JsValue> {
        use whispeer::DeleteError as D;
        let sub = id as u64;
        match self.eng.delete_durable(sub, now(mono_ms, unix_ms)) {
            Ok(fid) => {
                self.tokens.retain(|_, t| t.sub() != sub);
                Ok(fid as f64)
            }
            Err(e) => Err(js_error(
                match e {
                    D::Unsupported => "UNSUPPORTED",
                    D::NotDurable => "NOT_DURABLE",
                    _ => "DISCONNECTED",
                },
                &e.to_string(),
            )),
        }
    }

    /// The app took the message (or placeholder) handed out with `token`: returns its
    /// subscription's credit and acks it in relay order when the subscription acks.
    pub fn ack(&mut self, token: f64, mono_ms: f64, unix_ms: f64) {
        if let Some(t) = self.tokens.remove(&(token as u64)) {
            self.eng.ack(t, now(mono_ms, unix_ms));
        }
    }

    /// Asks the relay to confirm it processed everything sent before; a `flushed` or
    /// `flushFailed` event with the returned id follows.
    pub fn flush(&mut self, mono_ms: f64, unix_ms: f64) -> f64 {
        let n = now(mono_ms, unix_ms);
        // Behind the publishes still waiting for their seal job (run by `pollTransmit`).
        self.eng.flush(n) as f64
    }

    /// Closes for good: the `Close` frame, then the hang-up; everything still waiting fails,
    /// then the `closed` event.
    pub fn close(&mut self, mono_ms: f64, unix_ms: f64) {
        let n = now(mono_ms, unix_ms);
        // After the publishes still waiting for their seal job (run by `pollTransmit`).
        self.eng.close(n);
    }

    /// Adds a grant at run time; subscriptions are re-made with the new keys. `false` when
    /// the keyring ignored it (its epoch is older than every epoch held of its tree): then
    /// nothing was added, and an invite's dictionaries must not be either.
    #[wasm_bindgen(js_name = addGrant)]
    pub fn add_grant(
        &mut self,
        grant: &Grant,
        mono_ms: f64,
        unix_ms: f64,
    ) -> Result<bool, JsValue> {
        let n = now(mono_ms, unix_ms);
        let added = self
            .core
            .keys_mut()
            .add_grant_report_at(grant.inner.clone(), n.unix_ms)
            .map_err(key_error)?;
        if added.provenance.is_none() {
            return Ok(false);
        }
        self.eng.refresh_keys(n);
        if let Some(sv) = &mut self.saving {
            let kr = self.core.keyring.read().expect("keyring lock");
            persist::pins(&mut sv.journal, &kr.export_pins());
            // A new epoch starts the previous one's grace: its time is saved at once.
            persist::superseded_all(&mut sv.journal, &kr.superseded_epochs());
        }
        Ok(true)
    }

    /// Adds a zstd dictionary (`wsdict1…` or raw bytes) at run time, for tree `tree_id` only
    /// (an invite's) or, without one, every tree (PROTOCOL §4.6.1); returns its id.
    #[wasm_bindgen(js_name = addDictionary)]
    pub fn add_dictionary(
        &mut self,
        dict: JsValue,
        tree_id: Option<String>,
    ) -> Result<String, JsValue> {
        let d = crate::keys::parse_dictionary(&dict)?;
        let tree = tree_id
            .as_deref()
            .map(crate::client::parse_tree_id)
            .transpose()?;
        let id = d.id().to_string();
        let mut keys = self.core.keys_mut();
        match tree {
            Some(t) => keys.add_dictionary_for(t, d),
            None => keys.try_add_dictionary(d),
        }
        .map_err(key_error)?;
        Ok(id)
    }

    /// Throws (`KEY`, too many dictionaries) unless the keyring has room for those of
    /// `dicts` (`wsdict1…` strings or raw bytes) it does not hold yet
    /// (`MAX_DICTIONARIES`). `Client.addKeys` asks before adding an invite's grant, so an
    /// invite beyond the bound adds nothing — its grant neither — as the Rust keyring
    /// refuses it whole (`Keyring::accept_invite_at`, PROTOCOL §7).
    #[wasm_bindgen(js_name = checkDictionaryRoom)]
    pub fn check_dictionary_room(&self, dicts: Vec<JsValue>) -> Result<(), JsValue> {
        let parsed = dicts
            .iter()
            .map(crate::keys::parse_dictionary)
            .collect::<Result<Vec<_>, _>>()?;
        let kr = self.core.keyring.read().expect("keyring lock");
        let held = kr.dictionaries();
        let mut new = Vec::new();
        for d in &parsed {
            if held.get(&d.id()).is_none() && !new.contains(&d.id()) {
                new.push(d.id());
            }
        }
        if held.len().saturating_add(new.len()) > whispeer_protocol::MAX_DICTIONARIES {
            return Err(key_error(
                whispeer_protocol::KeyError::TooManyDictionaries {
                    held: held.len(),
                    adding: new.len(),
                    max: whispeer_protocol::MAX_DICTIONARIES,
                },
            ));
        }
        Ok(())
    }

    /// See `ClientCore.allowSealing`.
    #[wasm_bindgen(js_name = allowSealing)]
    pub fn allow_sealing(&mut self, tree_id: &str, scope: &str) -> Result<(), JsValue> {
        self.core.allow_sealing(tree_id, scope)
    }

    // ---- outputs -----------------------------------------------------------------------

    /// The next thing to do: a `Uint8Array` (a frame for the current socket), `{ dial: id,
    /// relay }` (open a socket to URL number `relay` of the `relays` given), `{ hangup: id }` (close it after what was sent), or `undefined`.
    #[wasm_bindgen(js_name = pollTransmit)]
    pub fn poll_transmit(&mut self) -> JsValue {
        self.run_seal_jobs(self.seal_now);
        // Kept publishes go to the journal before their frames can leave: the driver saves
        // it (`takeChanges`) before it writes what this returns.
        self.save_kept();
        match self.eng.poll_transmit() {
            None => JsValue::UNDEFINED,
            Some(Transmit::Frame(b)) => Uint8Array::from(&b[..]).into(),
            Some(Transmit::Dial(c)) => {
                let o = Object::new();
                set(&o, "dial", c as f64);
                set(&o, "relay", self.eng.dial_relay(c) as f64);
                o.into()
            }
            Some(Transmit::Hangup(c)) => {
                let o = Object::new();
                set(&o, "hangup", c as f64);
                o.into()
            }
        }
    }

    /// Seals the publishes handed over so far and journals the kept ones, sending nothing:
    /// with persistence, a QoS ≥ 1 publish made while the driver is already draining (from
    /// inside a subscription callback) is sealed and saved before `publish` returns, as
    /// every other is; its frame leaves with the drain's next `pollTransmit`.
    #[wasm_bindgen(js_name = sealPending)]
    pub fn seal_pending(&mut self) {
        self.run_seal_jobs(self.seal_now);
        self.save_kept();
    }

    /// The next deadline (`monoMs`), if any.
    #[wasm_bindgen(js_name = pollTimeout)]
    pub fn poll_timeout(&self) -> Option<f64> {
        self.eng.poll_timeout().map(|t| t as f64)
    }

    /// The CBOR value of the message of the last `message` event (throws its decoding
    /// error), for `readMessage` (js/message.js).
    #[wasm_bindgen(js_name = takeValue)]
    pub fn take_value(&mut self) -> Result<JsValue, JsValue> {
        self.core.take_value()
    }

    /// The next event as a plain object (`type`: `connected`, `disconnected`, `closed`,
    /// `message`, `placeholder`, `gap`, `dropped`, `replayDone`, `subscribed`,
    /// `subscribeFailed`, `puback`, `publishFailed`, `flushed`, `flushFailed`, `error`), or
    /// `undefined`. A `message` event's `at` is the message in wasm memory, valid
    /// until the next call (`readMessage`, js/message.js, reads it).
    #[wasm_bindgen(js_name = pollEvent)]
    pub fn poll_event(&mut self) -> JsValue {
        if self.saving.is_none() {
            // Nothing persists the receiver-state journal: dropped, not accumulated.
            self.eng.core_mut().take_changes();
        }
        self.save_kept();
        loop {
            let Some(e) = self.eng.poll_event() else {
                return JsValue::UNDEFINED;
            };
            if let Some(o) = self.event_object(e) {
                return o.into();
            }
        }
    }

    /// With persistence: the state records recorded since the last call (kept and
    /// acknowledged publishes, dedup entries, retained high-water marks, pins), to append
    /// to the saved state before reporting anything the inputs produced; `undefined` when
    /// nothing changed (always without persistence).
    #[wasm_bindgen(js_name = takeChanges)]
    pub fn take_changes(&mut self) -> Option<Uint8Array> {
        self.save_kept();
        let changes = self.eng.core_mut().take_changes();
        let sv = self.saving.as_mut()?;
        for c in &changes {
            sv.owed.apply(c);
            persist::change(&mut sv.journal, c);
        }
        if sv.journal.is_empty() {
            return None;
        }
        let out = Uint8Array::from(&sv.journal[..]);
        sv.journal.clear();
        Some(out)
    }

    /// With persistence: the whole state as a fresh log (what the saved state compacts
    /// to: header, pins, kept publishes, live dedup entries, retained marks). Pending
    /// changes are included (and no longer returned by `takeChanges`). `undefined` without
    /// persistence.
    pub fn snapshot(&mut self, unix_ms: f64) -> Option<Uint8Array> {
        self.save_kept();
        let changes = self.eng.core_mut().take_changes();
        let sv = self.saving.as_mut()?;
        // (The snapshot covers the pending changes; the owed ones update the saved rows.)
        for c in &changes {
            sv.owed.apply(c);
        }
        sv.journal.clear();
        let mut out = persist::MAGIC.to_vec();
        {
            let kr = self.core.keyring.read().expect("keyring lock");
            persist::pins(&mut out, &kr.export_pins());
            persist::superseded_all(&mut out, &kr.superseded_epochs());
        }
        for (pid, (order, frame)) in &sv.kept {
            persist::keep(&mut out, pid, *order, frame);
        }
        let snap = self.eng.core().guard().snapshot(unix_ms.max(0.0) as u64);
        for (d, exp) in snap.seen {
            persist::seen_digest(&mut out, d, exp);
        }
        for (key, ts_ms, msg_id) in snap.retained {
            persist::change(&mut out, &Change::Retained { key, ts_ms, msg_id });
        }
        persist::forgot_upto(&mut out, snap.forgot_upto);
        sv.owed.write(&mut out);
        Some(Uint8Array::from(&out[..]))
    }

    /// Bytes of frames queued and not yet taken by `pollTransmit`, and of publishes waiting
    /// for their batch signature.
    #[wasm_bindgen(js_name = queuedBytes)]
    pub fn queued_bytes(&self) -> f64 {
        self.eng.queued_bytes() as f64
    }

    /// Payload bytes of publishes waiting for their batch signature.
    #[wasm_bindgen(js_name = batchBytes)]
    pub fn batch_bytes(&self) -> f64 {
        self.eng.sealing_bytes() as f64
    }

    /// Bytes at the end of the loaded state that were no whole record and were dropped (a
    /// write cut short; a damaged record length is refused as corrupt, except in a log of
    /// format version 1), 0 without persistence.
    #[wasm_bindgen(js_name = restoreTornBytes)]
    pub fn restore_torn_bytes(&self) -> f64 {
        self.saving.as_ref().map_or(0, |s| s.torn) as f64
    }

    /// Counters: `{delivered, rejected, duplicates, relayGaps, heldBack, heldForOrder,
    /// namedPaused, refused: {...}, slowSubscriberDrops, outboxDrops, reconnects,
    /// unackedPublishes, sealingPublishes}`, as the Rust client's `EngineStats`: `unackedPublishes` counts
    /// QoS ≥ 1 publishes in the outbox waiting for their `PubAck`, `sealingPublishes` those
    /// still waiting for their batch signature (not yet in the outbox; each moves to
    /// `unackedPublishes` once sealed). With persistence a kept publish is sealed and saved
    /// at once, so it never counts as sealing.
    pub fn stats(&self) -> JsValue {
        let s = self.eng.stats();
        let o = crate::client::core_stats_object(&s.core);
        set(&o, "slowSubscriberDrops", s.slow_subscriber_drops as f64);
        set(&o, "outboxDrops", s.outbox_drops as f64);
        set(&o, "reconnects", s.reconnects as f64);
        set(&o, "unackedPublishes", s.unacked_publishes as f64);
        set(&o, "sealingPublishes", s.sealing_publishes as f64);
        let skipped = self.saving.as_ref().map_or(0, |s| s.refused_kept);
        set(
            &o,
            "restoreRefused",
            (s.restore_refused + skipped as u64) as f64,
        );
        o.into()
    }
}

/// The `tree` option of a publish or subscribe, when given (a string; its digits are
/// checked where it is used).
fn tree_option(options: &JsValue) -> Result<Option<String>, JsValue> {
    match get(options, "tree") {
        None => Ok(None),
        Some(t) => Ok(Some(t.as_string().ok_or_else(|| {
            js_error(
                "INVALID_TREE",
                "tree: expected 32 hex digits (a message's treeId)",
            )
        })?)),
    }
}

impl Engine {
    fn publish_payload(
        &mut self,
        topic: &str,
        content_type: &str,
        payload: &[u8],
        options: &JsValue,
        n: Now,
    ) -> Result<Option<String>, JsValue> {
        let tree = tree_option(options)?;
        let o = PubOptions::new()
            .qos(qos(options)?)
            .retain(flag(options, "retain")?.unwrap_or(false))
            .ack(flag(options, "ack")?.unwrap_or(false));
        if self.core.batches().is_some() {
            if self.eng.is_closed() {
                return Err(publish_error(whispeer::PublishError::Closed));
            }
            let prepared = self.core.prepare(tree, topic, content_type, payload)?;
            let pid = self
                .eng
                .publish_prepared(prepared, o, n)
                .map_err(publish_error)?;
            self.seal_now = n;
            return Ok(pid.as_ref().map(pid_hex));
        }
        let env = self.core.seal(tree, topic, content_type, payload)?;
        let pid = self.eng.publish(env, o, n).map_err(publish_error)?;
        self.save_kept();
        Ok(pid.as_ref().map(pid_hex))
    }

    /// With persistence: journals the publishes the engine kept since the last call (once
    /// it holds their frames, before any of them leaves: `pollTransmit` calls it first).
    fn save_kept(&mut self) {
        while let Some((p, order, frame)) = self.eng.poll_kept() {
            if let Some(sv) = &mut self.saving {
                persist::keep(&mut sv.journal, &p.0, order, &frame);
                sv.kept.insert(p.0, (order, frame));
            }
        }
    }

    /// Runs the engine's seal jobs here (no threads in wasm), each at once: the engine
    /// hands their publishes on in publish order; failures become `publishFailed` events.
    fn run_seal_jobs(&mut self, n: Now) {
        while let Some(job) = self.eng.poll_seal_job(n) {
            let done = self.core.seal_job(job);
            self.eng.handle_sealed(done, n);
        }
    }

    /// A kept publish was acknowledged or refused: no longer saved.
    fn settled(&mut self, pid: &PublishId) {
        if let Some(sv) = &mut self.saving {
            if sv.kept.remove(&pid.0).is_some() {
                persist::acked(&mut sv.journal, &pid.0);
            }
        }
    }

    fn token(&mut self, t: AckToken) -> f64 {
        let id = self.next_token;
        self.next_token += 1;
        self.tokens.insert(id, t);
        id as f64
    }

    fn event_object(&mut self, e: E) -> Option<Object> {
        let o = Object::new();
        let ty = match e {
            E::Connected {
                session,
                heartbeat_ms,
                relay,
            } => {
                set(&o, "relay", relay as f64);
                set(&o, "session", hex::encode(session));
                set(&o, "heartbeatMs", heartbeat_ms as f64);
                "connected"
            }
            E::Disconnected {
                reason,
                attempt,
                retry_at,
            } => {
                set(&o, "reason", reason.to_string());
                set(&o, "code", disconnect_code(&reason));
                set(&o, "attempt", attempt);
                if let Some(t) = retry_at {
                    set(&o, "retryAt", t as f64);
                }
                "disconnected"
            }
            E::Closed => "closed",
            E::Message { sub, msg, token } => {
                set(&o, "sub", sub as f64);
                // Read by `readMessage` (js/message.js) before the next event is polled.
                set(&o, "at", self.core.stage_message(&msg));
                set(&o, "token", self.token(token));
                "message"
            }
            E::Placeholder { sub, token } => {
                set(&o, "sub", sub as f64);
                set(&o, "token", self.token(token));
                "placeholder"
            }
            E::Gap { dropped, subs } => {
                set(&o, "dropped", dropped as f64);
                let a: Array = subs.iter().map(|s| JsValue::from(*s as f64)).collect();
                set(&o, "subs", a);
                "gap"
            }
            E::Dropped { sub, n } => {
                set(&o, "sub", sub as f64);
                set(&o, "n", n as f64);
                "dropped"
            }
            E::ReplayDone { sub, seq } => {
                set(&o, "sub", sub as f64);
                set(&o, "seq", seq as f64);
                "replayDone"
            }
            E::SubscribeOk { sub } => {
                set(&o, "sub", sub as f64);
                "subscribed"
            }
            E::SubscribeErr { sub, error } => {
                self.tokens.retain(|_, t| t.sub() != sub);
                let e = subscribe_error(error.into());
                set(&o, "sub", sub as f64);
                set(&o, "error", e);
                "subscribeFailed"
            }
            E::PubAck { pid, seq } => {
                self.settled(&pid);
                set(&o, "id", pid_hex(&pid));
                set(&o, "seq", seq as f64);
                "puback"
            }
            E::PublishFailed { pid, reason } => {
                // A kept publish the engine gave up on at close stays saved: a later run
                // re-sends it (as the Rust driver does).
                if reason != PublishFailure::Closed {
                    self.settled(&pid);
                }
                set(&o, "id", pid_hex(&pid));
                set(&o, "error", publish_error(reason.into()));
                "publishFailed"
            }
            E::Flushed { id } => {
                set(&o, "id", id as f64);
                "flushed"
            }
            E::FlushFailed { id } => {
                set(&o, "id", id as f64);
                "flushFailed"
            }
            E::DurableDeleted { id, error } => {
                set(&o, "id", id as f64);
                if let Some((code, message)) = error {
                    set(&o, "code", code.name());
                    set(&o, "message", message);
                }
                "durableDeleted"
            }
            E::RelayError { code, message, sub } => {
                set(&o, "code", code.name());
                set(&o, "message", message);
                if let Some(s) = sub {
                    set(&o, "sub", s as f64);
                }
                "error"
            }
            // A QoS 0 publish the relay refused (an `Err` naming no request): the same
            // `error` event as before the Rust engine told it apart (the JS client reports
            // it, budgeted, as a relay error).
            E::PublishRefused { code, message } => {
                set(&o, "code", code.name());
                set(&o, "message", message);
                "error"
            }
            _ => return None,
        };
        set(&o, "type", ty);
        Some(o)
    }
}

/// A stable code for why a connection ended (the `WhispeerError` code of a failed connect).
fn disconnect_code(d: &whispeer::core::connection::Disconnect) -> &'static str {
    use whispeer::core::connection::Disconnect as D;
    match d {
        D::Timeout => "TIMEOUT",
        D::Rejected { .. } => "REJECTED",
        D::AuthNotBound(_) => "AUTH_NOT_BOUND",
        D::Transport(_) => "CONNECT",
        _ => "PROTOCOL",
    }
}
