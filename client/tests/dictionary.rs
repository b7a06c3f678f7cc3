//! The Rust SDK with a zstd dictionary (codec 3, PROTOCOL §4.6.1): the dictionary travels
//! with the keys (a `wsdict1…` string among `Encryption::with_keys`), a topic rule names it
//! (`Compression::zstd_dict`), a subscriber holding it reads the messages and one without it
//! does not (counted as refused), over the real relay.

mod support;

use futures_util::StreamExt;
use support::*;
use whispeer::protocol::Dictionary;
use whispeer::{Client, Compression, Encryption, TopicOptions, WebSocket};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dictionary_travels_with_the_keys_and_compresses_a_topic() {
    let relay = TestRelay::start().await;
    let url = relay.ws_url();
    let tree = tree("dict");
    let dict = Dictionary::new(
        br#"{"device":"th-0000","room":"kitchen","celsius":21.5,"ok":true}"#.repeat(6),
    )
    .unwrap();
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
