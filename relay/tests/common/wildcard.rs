//! The reviewer's wildcard construction (relay README, "routing cost of wildcard
//! filters"): 1,872 filters of 32 levels on key id [`K`] — for filter `i`, level `j < 11`
//! is `+` if bit `j` of `i` is set, else `p_j`; levels 11..=30 `+`; level 31 a token `Z`
//! no publish uses — make a publish on `P = [K, p_0 .. p_31]` ([`path`]) visit 41,359
//! index nodes and match none of them. With an exact subscription on `P` the walk is
//! 41,391 nodes: 646 walk tokens (`rate::walk_tokens`). And the metric helpers the tests
//! observe it through.

use super::*;

#[allow(unused_imports)] // each test binary uses a part
pub use super::construction::{path, FILTERS, Z};

pub const K: u8 = 7;

/// The filter `i` of the construction.
pub fn filter(i: u32) -> TokenPattern {
    pattern(K, &super::construction::levels(i), false)
}

/// The value of an unlabelled metric line (or a labelled one, given with its labels).
pub fn metric(relay: &TestRelay, name: &str) -> u64 {
    let text = relay.handle.metrics().render_prometheus(0);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
        .trim()
        .parse()
        .expect("an integer")
}

/// Waits until `name` reaches `want` (it is set by the relay's task after the frames the
/// test waits on): an event, bounded by the helpers' generous timeout.
pub async fn metric_reaches(relay: &TestRelay, name: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while metric(relay, name) < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {want}: {}",
            metric(relay, name)
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Subscribes `ids` (pipelined), then reads their `SubOk`s.
pub async fn subscribe_all(c: &mut Client, ids: impl Iterator<Item = u32> + Clone) {
    for i in ids.clone() {
        c.send(&sub_frame(u64::from(i), filter(i))).await;
    }
    for i in ids {
        match c.recv().await {
            Frame::SubOk(s) => assert_eq!(s.sub_id, u64::from(i)),
            other => panic!("expected SubOk for {i}, got {other:?}"),
        }
    }
}

/// A connection from `from`, greeted.
pub async fn greeted(relay: &TestRelay, from: &str) -> Client {
    let mut c = Client::tcp_from(relay.tcp(), from).await;
    c.hello().await;
    c
}

/// The whole construction, on two connections from 127.0.0.1 (`max_subscriptions` 1,000
/// each; the tenant's default byte quota holds no 1,873rd filter).
pub async fn construction(relay: &TestRelay) -> [Client; 2] {
    let mut attackers = [
        greeted(relay, "127.0.0.1").await,
        greeted(relay, "127.0.0.1").await,
    ];
    let half = FILTERS / 2;
    subscribe_all(&mut attackers[0], 0..half).await;
    subscribe_all(&mut attackers[1], half..FILTERS).await;
    attackers
}
