//! The Rust side of the interop tests (client-wasm/test): publishes `Sample` values or
//! subscribes and prints what arrives, one JSON line per message.
//!
//! ```text
//! interop_peer sub --url ws://… --key wstree1… --filter 'interop/+/#' --count 6
//!     prints {"ready":true} once the relay confirmed the subscription, then per message
//!     {"topic":…,"i":…,"ok":<equals Sample::expected(i)>,"sender":…,"value":…}
//! interop_peer pub --url ws://… --key wstree1… --prefix interop/rust --count 6 [--compression none]
//!     publishes Sample::expected(i) on "<prefix>/<i>", flushes, prints {"published":n}
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use futures_util::StreamExt;
use whispeer::{Client, Compression, Encryption, Identity, Keyring, TreeKey, WebSocket};
use whispeer_protocol::Grant;
use whispeer_tests::Sample;

fn usage() -> ExitCode {
    eprintln!(
        "usage: interop_peer (sub --filter F | pub --prefix P [--compression none|zstd]) \
         --url URL --key KEY --count N"
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
    let (Some(url), Some(key)) = (opts.get("url"), opts.get("key")) else {
        return usage();
    };
    let count: u32 = opts.get("count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let keys = match keyring(key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("bad key: {e}");
            return ExitCode::from(2);
        }
    };
    let compression = match opts.get("compression").map(String::as_str) {
        Some("none") => Compression::none(),
        _ => Compression::zstd(3),
    };
    let me = Identity::generate();
    let client = match Client::builder()
        .with(WebSocket::new(url.clone()))
        .with(Encryption::with_keyring(keys))
        .with(compression)
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
