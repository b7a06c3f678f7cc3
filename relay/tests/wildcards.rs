//! Table-driven wildcard matching through the real relay: exact tokens, `+`, `#` (which
//! also matches its parent level, as in MQTT) and key ids (different ones never match).
//!
//! "Not delivered" is observed without timing: after the case's message the publisher
//! sends a marker that the subscriber certainly matches; per-connection order is preserved,
//! so if the next frame is the marker, the case's message was not delivered.

mod common;

use common::*;
use whispeer_relay::Config;

/// (filter key, filter elems (`Some(t)` token, `None` `+`), ends with `#`, path key, path, matches)
type Case = (u8, &'static [Option<u8>], bool, u8, &'static [u8], bool);

const CASES: &[Case] = &[
    // exact
    (1, &[Some(1), Some(2)], false, 1, &[1, 2], true),
    (1, &[Some(1), Some(2)], false, 1, &[1], false),
    (1, &[Some(1), Some(2)], false, 1, &[1, 2, 3], false),
    (1, &[Some(1), Some(2)], false, 1, &[1, 3], false),
    (1, &[Some(1), Some(2)], false, 1, &[2, 1], false),
    // + : exactly one level
    (1, &[None], false, 1, &[5], true),
    (1, &[None], false, 1, &[5, 6], false),
    (1, &[Some(1), None], false, 1, &[1, 2], true),
    (1, &[Some(1), None], false, 1, &[1], false),
    (1, &[Some(1), None], false, 1, &[1, 2, 3], false),
    (1, &[None, Some(2)], false, 1, &[9, 2], true),
    (1, &[None, Some(2)], false, 1, &[9, 3], false),
    (1, &[None, None], false, 1, &[1, 2], true),
    (1, &[None, None], false, 1, &[1], false),
    (1, &[Some(1), None, Some(3)], false, 1, &[1, 7, 3], true),
    (1, &[Some(1), None, Some(3)], false, 1, &[1, 7, 4], false),
    // # : the rest, including the parent level itself
    (1, &[], true, 1, &[1], true),
    (1, &[], true, 1, &[1, 2, 3], true),
    (1, &[Some(1)], true, 1, &[1], true),
    (1, &[Some(1)], true, 1, &[1, 2], true),
    (1, &[Some(1)], true, 1, &[1, 2, 3, 4], true),
    (1, &[Some(1)], true, 1, &[2], false),
    (1, &[Some(1)], true, 1, &[2, 1], false),
    (1, &[Some(1), Some(2)], true, 1, &[1], false),
    (1, &[Some(1), None], true, 1, &[1], false),
    (1, &[Some(1), None], true, 1, &[1, 2], true),
    (1, &[Some(1), None], true, 1, &[1, 2, 3], true),
    (1, &[None], true, 1, &[1], true),
    // key ids: different trees/epochs never match, even with #
    (1, &[Some(1)], false, 2, &[1], false),
    (1, &[], true, 2, &[1], false),
    (1, &[None], false, 2, &[1], false),
    (2, &[Some(1)], false, 2, &[1], true),
];

const MARKER_KEY: u8 = 250;

#[tokio::test]
async fn wildcard_table() {
    let relay = TestRelay::start(Config::ephemeral()).await;
    let mut publ = Client::tcp(relay.tcp()).await;
    publ.hello().await;
    for (i, &(fk, elems, rest, pk, path, want)) in CASES.iter().enumerate() {
        // Alternate transports so both carry the suite.
        let mut sub = if i % 2 == 0 {
            Client::tcp(relay.tcp()).await
        } else {
            Client::ws(relay.ws()).await
        };
        sub.hello().await;
        sub.subscribe(1, pattern(fk, elems, rest)).await;
        sub.subscribe(2, exact(MARKER_KEY, &[i as u8])).await;
        let env = envelope(pk, path);
        let marker = envelope(MARKER_KEY, &[i as u8]);
        publ.publish(env.clone()).await;
        publ.publish(marker.clone()).await;
        let first = sub.expect_msg().await;
        let got = first.envelope == env;
        assert_eq!(
            got,
            want,
            "case {i}: filter key {fk} {elems:?}{} vs path key {pk} {path:?}",
            if rest { " #" } else { "" }
        );
        if got {
            assert_eq!(sub.expect_msg().await.envelope, marker);
        } else {
            assert_eq!(first.envelope, marker, "case {i}");
        }
    }
}
