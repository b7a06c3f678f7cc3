//! The Rust SDK with a zstd dictionary (codec 3, PROTOCOL §4.6.1): the dictionary travels
//! with the keys (a `wsdict1…` string among `Encryption::with_keys`) or inside an invite
//! (format 3, PROTOCOL §7), a topic rule names it (`Compression::zstd_dict`), a subscriber
//! holding it reads the messages and one without it does not (counted as refused), over
//! the real relay.

mod support;

use futures_util::StreamExt;
use support::*;
use whispeer::protocol::Dictionary;
use whispeer::{
    Client, Compression, Encryption, Identity, Invite, Keyring, Scope, Topic, TopicOptions,
    WebSocket,
};

async fn client(url: &str, keys: Vec<String>, rule: Option<TopicOptions>) -> Client {
    let mut b = Client::builder()
        .with(WebSocket::new(url))
        .with(Encryption::with_keys(keys).unwrap())
        .with(identity());
    if let Some(r) = rule {
        b = b.with(r);
    }
    b.connect().await.unwrap()
}

/// A raw-content dictionary: what the telemetry readings have in common.
fn telemetry_dict() -> Dictionary {
    Dictionary::new(br#"{"device":"th-0000","room":"kitchen","celsius":21.5,"ok":true}"#.repeat(6))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dictionary_travels_with_the_keys_and_compresses_a_topic() {
    let relay = TestRelay::start().await;
    let url = relay.ws_url();
    let tree = tree("dict");
    let dict = telemetry_dict();
    let tk = tree.to_key_string().to_string();
    let dk = dict.to_key_string().to_string();
    let rule = TopicOptions::new("sensor/#").compression(Compression::zstd_dict(3, &dict));
    let publisher = client(&url, vec![tk.clone(), dk.clone()], Some(rule)).await;
    let reader = client(&url, vec![tk.clone(), dk], None).await;
    let lacking = client(&url, vec![tk], None).await;
    let mut with = reader.subscribe_bytes("sensor/#").await.unwrap();
    let mut without = lacking.subscribe_bytes("sensor/#").await.unwrap();
    let value = br#"{"device":"th-0042","room":"kitchen","celsius":19.25,"ok":true}"#;
    publisher
        .publish_bytes("sensor/kitchen", "application/json", value)
        .await
        .unwrap();
    let m = within("delivery", with.next()).await.unwrap().unwrap();
    assert_eq!(&m.value[..], &value[..]);
    // The subscriber without the dictionary refuses it (counted), delivers nothing: the next
    // thing it delivers is a plain marker published after it (the relay keeps their order).
    let mut refused = lacking.stats_changes();
    within("refused", refused.wait_for(|s| s.core.rejected == 1))
        .await
        .unwrap();
    reader
        .publish_bytes("sensor/marker", "text/plain", b"marker")
        .await
        .unwrap();
    let next = within("the marker", without.next()).await.unwrap().unwrap();
    assert_eq!(
        &next.value[..],
        b"marker",
        "nothing delivered without the dictionary"
    );
    relay.stop().await;
}

/// Invitees who hold nothing but what an invite carried — one accepting it into the keyring
/// it connects with, one into a running client (`Client::accept_invite`) — read a topic the
/// publisher compresses with a dictionary: the invite carried the dictionary with the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitee_reads_a_dictionary_topic_with_only_what_the_invite_carried() {
    let relay = TestRelay::start().await;
    let url = relay.ws_url();
    let tree = tree("invite-dict");
    let dict = telemetry_dict();
    // The admin's keyring holds the tree key and the dictionary; the invite carries the
    // dictionaries it holds (the keyring does not link a dictionary to topics).
    let mut admin_keys = keyring_with(&tree);
    admin_keys.add_dictionary(dict.clone());
    let admin = identity();
    let (bob, carol) = (Identity::generate(), Identity::generate());
    let grant = tree.grant(&Scope::Subtree(Topic::new("sensor").unwrap()));
    let held: Vec<Dictionary> = admin_keys.dictionaries().iter().cloned().collect();
    let expiry = whispeer::now_ms() + 60_000;
    let invite = |to: &Identity| {
        Invite::seal_with_dictionaries(
            &grant,
            &held,
            &admin,
            &to.public_id(),
            expiry,
            &mut rand_core::OsRng,
        )
        .unwrap()
    };
    let (for_bob, for_carol) = (invite(&bob), invite(&carol));

    let opened = Invite::open(&for_bob, &bob, whispeer::now_ms()).unwrap();
    assert_eq!(opened.inviter, admin.sender_id());
    assert_eq!(opened.dictionaries, vec![dict.clone()]);
    let mut bob_keys = Keyring::new();
    bob_keys.accept_invite(&opened).unwrap();
    let bob_client = ws_client(&url, bob_keys, bob).await;
    let carol_opened = Invite::open(&for_carol, &carol, whispeer::now_ms()).unwrap();
    let carol_client = ws_client(&url, Keyring::new(), carol).await;
    carol_client.accept_invite(&carol_opened).unwrap();
    let mut at_bob = bob_client.subscribe_bytes("sensor/#").await.unwrap();
    let mut at_carol = carol_client.subscribe_bytes("sensor/#").await.unwrap();
    // The same grant without the dictionaries: it refuses the message, so the publisher
    // really compressed with the dictionary (codec 3).
    let mut grant_only = Keyring::new();
    grant_only.add_grant(opened.grant.clone()).unwrap();
    let lacking = ws_client(&url, grant_only, identity()).await;
    let _without = lacking.subscribe_bytes("sensor/#").await.unwrap();
    let mut refused = lacking.stats_changes();

    let rule = TopicOptions::new("sensor/#").compression(Compression::zstd_dict(3, &dict));
    let publisher = Client::builder()
        .with(WebSocket::new(&url))
        .with(Encryption::with_keyring(admin_keys))
        .with(rule)
        .with(admin)
        .connect()
        .await
        .unwrap();
    let value = br#"{"device":"th-0042","room":"kitchen","celsius":19.25,"ok":true}"#;
    publisher
        .publish_bytes("sensor/kitchen", "application/json", value)
        .await
        .unwrap();
    for (who, sub) in [("bob", &mut at_bob), ("carol", &mut at_carol)] {
        let m = within(who, sub.next()).await.unwrap().unwrap();
        assert_eq!(&m.value[..], &value[..], "{who}");
    }
    within(
        "refused without the dictionary",
        refused.wait_for(|s| s.core.rejected == 1),
    )
    .await
    .unwrap();
    assert_eq!(bob_client.stats().core.rejected, 0);
    assert_eq!(carol_client.stats().core.rejected, 0);
    relay.stop().await;
}
