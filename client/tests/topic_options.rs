//! Per-topic sealing rules (`TopicOptions`) inherit what they do not set from the
//! client-wide settings as finally configured, whatever the order of the builder's `with`
//! calls (review B5; the npm client's 38e951a): a rule naming only a suite never turns
//! compression back on for a client that turned it off (PROTOCOL §11: a length leak for
//! payloads mixing secrets with attacker-influenced data). Observed on the wire: the
//! envelopes of the `Pub` frames the client sends, through a recording proxy to a real
//! relay.

mod support;

use support::raw::RecordingProxy;
use support::*;
use whispeer::protocol::frame::Frame;
use whispeer::protocol::Suite;
use whispeer::{CipherSuite, Client, ClientBuilder, Compression, Encryption, Tcp, TopicOptions};

/// The rules: a suite only, and compression named.
fn rules(b: ClientBuilder) -> ClientBuilder {
    b.with(TopicOptions::new("a/#").suite(CipherSuite::aes_gcm()))
        .with(TopicOptions::new("z/#").compression(Compression::zstd(3)))
}

/// Publishes 1000 zero bytes on `a/b`, `z/x` and `q` through a client built by `build`;
/// returns each envelope's length and suite, in that order.
async fn envelopes(build: fn(ClientBuilder) -> ClientBuilder) -> Vec<(usize, Suite)> {
    let relay = TestRelay::start().await;
    let proxy = RecordingProxy::start(relay.addrs.tcp.unwrap()).await;
    let t = tree("topic-options");
    let b = Client::builder()
        .with(Tcp::new(format!("tcp://{}", proxy.addr)))
        .with(Encryption::with_keyring(keyring_with(&t)))
        .with(identity());
    let c = build(b).connect().await.unwrap();
    let zeros = vec![0u8; 1000];
    for topic in ["a/b", "z/x", "q"] {
        c.publish_bytes(topic, "application/octet-stream", &zeros)
            .await
            .unwrap();
    }
    within("flush", c.flush()).await.unwrap();
    let got = proxy
        .sent
        .lock()
        .unwrap()
        .iter()
        .filter_map(|f| match f {
            Frame::Pub(p) => Some((p.envelope.len(), p.envelope.cipher_suite())),
            _ => None,
        })
        .collect();
    c.close().await;
    relay.stop().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_rule_inherits_the_clients_compression_in_either_order() {
    let rules_first = envelopes(|b| rules(b).with(Compression::none())).await;
    let setting_first = envelopes(|b| rules(b.with(Compression::none()))).await;
    for (order, got) in [
        ("rules first", &rules_first),
        ("setting first", &setting_first),
    ] {
        let [(a, a_suite), (z, _), (q, _)] = got[..] else {
            panic!("{order}: three publishes, got {got:?}");
        };
        assert!(
            a >= 1000,
            "{order}: a/b (suite-only rule) compressed: {a} bytes"
        );
        assert_eq!(a_suite, Suite::Aes256Gcm, "{order}: a/b's rule suite");
        assert!(
            z < 500,
            "{order}: z/x (rule names zstd) not compressed: {z} bytes"
        );
        assert!(q >= 1000, "{order}: q (no rule) compressed: {q} bytes");
    }
}
