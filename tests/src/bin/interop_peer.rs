//! The Rust side of the interop tests (client-wasm/test): publishes `Sample` values or
//! subscribes and prints what arrives, one JSON line per message.
//!
//! ```text
//! interop_peer sub --url ws://… --key wstree1… --filter 'interop/+/#' --count 6
//!     prints {"ready":true} once the relay confirmed the subscription, then per message
//!     {"topic":…,"i":…,"ok":<equals Sample::expected(i)>,"sender":…,"value":…}
//! interop_peer pub --url ws://… --key wstree1… --prefix interop/rust --count 6 [--compression none]
//!     publishes Sample::expected(i) on "<prefix>/<i>", flushes, prints {"published":n}
//! interop_peer typed-pub --url ws://… --key wstree1… --topic T --order ABA
//!     typed topics: per letter publishes the next `Point` (A, tag "interop.Point/v1") or
//!     `Note` (B, tag "interop.Note/v1") on T through `client.topic::<_>(T)` (two clients: a
//!     topic has one type per client), flushing after each so the relay keeps the order;
//!     prints {"published":"ABA","sender":…}
//! interop_peer typed-sub --url ws://… --key wstree1… --topic T --type A|B --count N
//!     a typed subscription (`client.topic::<Point|Note>(T)`); prints {"ready":true}, then per
//!     item {"value":…,"contentType":…} or {"mismatch":{"expected":…,"found":…}}, then
//!     {"typeMismatches":<ClientStats::type_mismatches>}
//! interop_peer invite-seal --key wstree1… --to wsid1… [--scope 'a/#'] [--dict wsdict1…]
//!     seals an invite (format 3 with --dict, PROTOCOL §7) from a fresh identity; prints
//!     {"invite":"wsinv1…","inviter":"wspk1…"} (no relay)
//! `sub` (and the others) take `--invite wsinv1… --identity wssec1…` instead of `--key`: the
//! client's keyring is only what the invite carried (grant and dictionaries), accepted by
//! that identity, which the client then uses.
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use whispeer::{
    Client, Compression, Encryption, Identity, Invite, Keyring, ReceiveError, Scope, Topic,
    TreeKey, TypeTag, WebSocket,
};
use whispeer_protocol::{Dictionary, Grant};
use whispeer_tests::Sample;

/// Type A of the typed-topic interop (JS declares the tag as the same string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "interop.Point/v1")]
struct Point {
    i: u32,
    x: i64,
    label: String,
}

impl Point {
    fn expected(i: u32) -> Self {
        Point {
            i,
            x: -(i64::from(i) * 1000) - 7,
            label: format!("point-{i}"),
        }
    }
}

/// Type B of the typed-topic interop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TypeTag)]
#[whispeer(type = "interop.Note/v1")]
struct Note {
    i: u32,
    text: String,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: interop_peer (sub --filter F | pub --prefix P [--compression none|zstd|lz4] [--suite xchacha|aes-gcm] \
         | typed-pub --topic T --order ABA | typed-sub --topic T --type A|B) \
         --url URL (--key KEY | --invite INVITE --identity SECRET) [--count N] \
         | invite-seal --key TREE_KEY --to PUBLIC_ID [--scope S] [--dict DICT]"
    );
    ExitCode::from(2)
}

fn keyring(key: &str) -> Result<Keyring, String> {
    let mut kr = Keyring::new();
    let now = whispeer::now_ms();
    if key.starts_with("wstree1") {
        let tk: TreeKey = key.parse().map_err(|e| format!("{e}"))?;
        kr.add_tree_key_at(&tk, now).map_err(|e| e.to_string())?;
    } else {
        let g: Grant = key.parse().map_err(|e| format!("{e}"))?;
        kr.add_grant_at(g, now).map_err(|e| e.to_string())?;
    }
    Ok(kr)
}

/// A keyring holding only what `invite` carried, accepted by `me`.
fn accepted(invite: &str, me: &Identity) -> Result<Keyring, String> {
    let inv = Invite::open(invite, me, whispeer::now_ms()).map_err(|e| e.to_string())?;
    let mut kr = Keyring::new();
    kr.accept_invite(&inv).map_err(|e| e.to_string())?;
    Ok(kr)
}

/// `invite-seal`: an invite for `--to` with the tree key's grant for `--scope` (`#`,
/// `a/#` or `a/b`) and the `--dict` dictionary, signed by a fresh identity.
fn invite_seal(opts: &HashMap<String, String>) -> Result<serde_json::Value, String> {
    let (Some(key), Some(to)) = (opts.get("key"), opts.get("to")) else {
        return Err("invite-seal needs --key and --to".into());
    };
    let tk: TreeKey = key.parse().map_err(|e| format!("{e}"))?;
    let scope = match opts.get("scope").map(String::as_str) {
        None | Some("#") => Scope::Tree,
        Some(s) => match s.strip_suffix("/#") {
            Some(p) => Scope::Subtree(Topic::new(p).map_err(|e| e.to_string())?),
            None => Scope::Topic(Topic::new(s).map_err(|e| e.to_string())?),
        },
    };
    let dicts = opts
        .get("dict")
        .map(|d| Dictionary::from_key_string(d))
        .transpose()
        .map_err(|e| e.to_string())?;
    let me = Identity::generate();
    let to: whispeer::PublicId = to.parse().map_err(|e| format!("{e}"))?;
    let inv = Invite::seal_with_dictionaries(
        &tk.grant(&scope),
        dicts.as_slice(),
        &me,
        &to,
        whispeer::now_ms() + 3_600_000,
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| e.to_string())?;
    Ok(serde_json::json!({ "invite": inv, "inviter": me.sender_id().to_string() }))
}

fn line(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(mode) = args.next() else {
        return usage();
    };
    let mut opts: HashMap<String, String> = HashMap::new();
    while let Some(k) = args.next() {
        let Some(name) = k.strip_prefix("--") else {
            return usage();
        };
        let Some(v) = args.next() else {
            return usage();
        };
        opts.insert(name.to_owned(), v);
    }
    if mode == "invite-seal" {
        return match invite_seal(&opts) {
            Ok(v) => {
                line(v);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invite-seal: {e}");
                ExitCode::from(2)
            }
        };
    }
    let Some(url) = opts.get("url") else {
        return usage();
    };
    let me = match opts
        .get("identity")
        .map(|s| Identity::from_secret_string(s))
    {
        None => Identity::generate(),
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            eprintln!("bad identity: {e}");
            return ExitCode::from(2);
        }
    };
    let count: u32 = opts.get("count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let keys = match (opts.get("key"), opts.get("invite")) {
        (Some(key), None) => keyring(key),
        (None, Some(invite)) => accepted(invite, &me),
        _ => return usage(),
    };
    let keys = match keys {
        Ok(k) => k,
        Err(e) => {
            eprintln!("bad key: {e}");
            return ExitCode::from(2);
        }
    };
    let compression = match opts.get("compression").map(String::as_str) {
        Some("none") => Compression::none(),
        Some("lz4") => Compression::lz4(),
        _ => Compression::zstd(3),
    };
    let suite = match opts.get("suite").map(String::as_str) {
        Some("aes-gcm") => whispeer::CipherSuite::aes_gcm(),
        _ => whispeer::CipherSuite::xchacha(),
    };
    let client = match Client::builder()
        .with(WebSocket::new(url.clone()))
        .with(Encryption::with_keyring(keys))
        .with(compression)
        .with(suite)
        .with(me)
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("connect: {e}");
            return ExitCode::from(1);
        }
    };
    match mode.as_str() {
        "typed-pub" => {
            let (Some(topic), Some(order), Some(key)) =
                (opts.get("topic"), opts.get("order"), opts.get("key"))
            else {
                return usage();
            };
            return match typed_pub(&client, url, key, topic, order).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("typed-pub: {e}");
                    ExitCode::from(1)
                }
            };
        }
        "typed-sub" => {
            let Some(topic) = opts.get("topic") else {
                return usage();
            };
            let r = match opts.get("type").map(String::as_str) {
                Some("A") => typed_sub::<Point>(&client, topic, count).await,
                Some("B") => typed_sub::<Note>(&client, topic, count).await,
                _ => return usage(),
            };
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("typed-sub: {e}");
                    ExitCode::from(1)
                }
            };
        }
        "sub" => {
            let Some(filter) = opts.get("filter") else {
                return usage();
            };
            let mut sub = match client.subscribe::<Sample>(filter).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("subscribe: {e}");
                    return ExitCode::from(1);
                }
            };
            line(serde_json::json!({ "ready": true }));
            let mut seen = 0;
            while seen < count {
                let Some(m) = sub.next().await else { break };
                seen += 1;
                match m {
                    Ok(m) => line(serde_json::json!({
                        "topic": m.topic.as_str(),
                        "i": m.value.i,
                        "ok": m.value == Sample::expected(m.value.i),
                        "sender": m.sender.map(|s| s.to_string()),
                        "value": format!("{:?}", m.value),
                    })),
                    Err(e) => line(serde_json::json!({ "error": e.to_string() })),
                }
            }
            client.close().await;
            if seen < count {
                eprintln!("subscription ended after {seen} of {count} messages");
                return ExitCode::from(1);
            }
        }
        "pub" => {
            let Some(prefix) = opts.get("prefix") else {
                return usage();
            };
            for i in 0..count {
                if let Err(e) = client
                    .publish(&format!("{prefix}/{i}"), &Sample::expected(i))
                    .await
                {
                    eprintln!("publish: {e}");
                    return ExitCode::from(1);
                }
            }
            if let Err(e) = client.flush().await {
                eprintln!("flush: {e}");
                return ExitCode::from(1);
            }
            line(
                serde_json::json!({ "published": count, "sender": client.sender_id().map(|s| s.to_string()) }),
            );
            client.close().await;
        }
        _ => return usage(),
    }
    ExitCode::SUCCESS
}

/// Publishes `order` (letters A and B) on `topic`: A through this client's
/// `topic::<Point>`, B through a second client's `topic::<Note>` (one type per topic per
/// client), flushed after each so the relay sequences them in this order.
async fn typed_pub(
    client: &Client,
    url: &str,
    key: &str,
    topic: &str,
    order: &str,
) -> Result<(), String> {
    let other = Client::builder()
        .with(WebSocket::new(url.to_owned()))
        .with(Encryption::with_keyring(keyring(key)?))
        .with(Identity::generate())
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let points = client.topic::<Point>(topic).map_err(|e| e.to_string())?;
    let notes = other.topic::<Note>(topic).map_err(|e| e.to_string())?;
    let (mut a, mut b) = (0, 0);
    for c in order.chars() {
        match c {
            'A' => {
                points
                    .publish(Point::expected(a))
                    .await
                    .map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())?;
                a += 1;
            }
            'B' => {
                let n = Note {
                    i: b,
                    text: format!("note-{b}"),
                };
                notes.publish(&n).await.map_err(|e| e.to_string())?;
                other.flush().await.map_err(|e| e.to_string())?;
                b += 1;
            }
            _ => return Err(format!("order: unknown type {c:?} (A or B)")),
        }
    }
    line(serde_json::json!({
        "published": order,
        "sender": client.sender_id().map(|s| s.to_string()),
        "otherSender": other.sender_id().map(|s| s.to_string()),
    }));
    other.close().await;
    client.close().await;
    Ok(())
}

/// Prints `count` items of a typed subscription (`T` or a `TypeMismatch`), then the count.
async fn typed_sub<T>(client: &Client, topic: &str, count: u32) -> Result<(), String>
where
    T: TypeTag + Serialize + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let typed = client.topic::<T>(topic).map_err(|e| e.to_string())?;
    let mut sub = typed.stream().await.map_err(|e| e.to_string())?;
    line(serde_json::json!({ "ready": true, "tag": T::TAG }));
    for _ in 0..count {
        let Some(m) = sub.next().await else {
            return Err("subscription ended early".into());
        };
        match m {
            Ok(m) => line(serde_json::json!({
                "value": serde_json::to_value(&m.value).map_err(|e| e.to_string())?,
                "contentType": m.content_type,
                "sender": m.sender.map(|s| s.to_string()),
            })),
            Err(ReceiveError::TypeMismatch {
                topic,
                expected,
                found,
            }) => line(serde_json::json!({
                "mismatch": { "topic": topic, "expected": expected, "found": found },
            })),
            Err(e) => line(serde_json::json!({ "error": e.to_string() })),
        }
    }
    line(serde_json::json!({ "typeMismatches": client.stats().type_mismatches }));
    client.close().await;
    Ok(())
}
