//! Two users chatting through whispeer.
//!
//! ```sh
//! # Everything in one process (an embedded relay):
//! cargo run -p whispeer --features in-process --example chat
//! # Through a running relay (`whispeer-relay serve`), e.g. its WebSocket port:
//! cargo run -p whispeer --features in-process --example chat -- ws://127.0.0.1:7480
//! ```
//!
//! Alice and Bob share nothing but a room name and a passphrase; each derives the same tree
//! key with Argon2id, signs with a fresh identity, and sees the other's verified sender id.
//! The relay only ever routes ciphertext under keyed tokens.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use whispeer::{Client, Compression, Encryption, Identity, Keyring, TreeKey, WebSocket};

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    from: String,
    text: String,
}

async fn user(url: Option<&str>, broker: Option<&whispeer::Broker>) -> anyhow::Result<Client> {
    let me = Identity::generate();
    Ok(match (url, broker) {
        (Some(url), _) => {
            let tree = TreeKey::from_passphrase("room-lobby", b"open sesame", Default::default())?;
            let mut keys = Keyring::new();
            keys.add_tree_key(&tree)?;
            Client::builder()
                .with(WebSocket::new(url))
                .with(Encryption::with_keyring(keys))
                .with(Compression::zstd(3))
                .with(me)
                .connect()
                .await?
        }
        (None, Some(b)) => b.client_builder().with(me).connect().await?,
        (None, None) => unreachable!(),
    })
}

/// The sender id of whoever is listening when `speaker` talks.
fn listener_id(speaker: &str, alice: &Client, bob: &Client) -> Option<whispeer::SenderId> {
    if speaker == "alice" {
        bob.sender_id()
    } else {
        alice.sender_id()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args().nth(1);
    let broker = match url {
        Some(_) => None,
        None => Some(
            whispeer::Broker::build_default()
                .passphrase("room-lobby", "open sesame")?
                .build()
                .await?,
        ),
    };
    let alice = user(url.as_deref(), broker.as_ref()).await?;
    let bob = user(url.as_deref(), broker.as_ref()).await?;
    let mut alice_in = alice.subscribe::<Line>("chat/lobby").await?;
    let mut bob_in = bob.subscribe::<Line>("chat/lobby").await?;

    let say = |c: &Client, from: &str, text: &str| {
        let (c, line) = (
            c.clone(),
            Line {
                from: from.into(),
                text: text.into(),
            },
        );
        async move { c.publish("chat/lobby", &line).await }
    };
    let script = [
        ("alice", "hi Bob, is this thing private?"),
        ("bob", "yes: the relay only sees tokens and ciphertext"),
        ("alice", "great, see you at 8"),
    ];
    for (who, text) in script {
        let (speaker, listener) = if who == "alice" {
            (&alice, &mut bob_in)
        } else {
            (&bob, &mut alice_in)
        };
        say(speaker, who, text).await?;
        // Everyone in the room gets every line, the speaker too: skip our own.
        let msg = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), listener.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("subscription ended"))??;
            if m.sender != listener_id(who, &alice, &bob) {
                break m;
            }
        };
        let sender = msg.sender.map(|s| s.to_string()).unwrap_or_default();
        println!(
            "[{}] {}: {}   (signed by {}…)",
            msg.topic,
            msg.value.from,
            msg.value.text,
            &sender[..sender.len().min(16)]
        );
    }
    alice.close().await;
    bob.close().await;
    if let Some(b) = broker {
        b.shutdown().await?;
    }
    Ok(())
}
