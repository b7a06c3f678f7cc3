//! The routing walk's cost is charged to the publisher, through the real relay.
//!
//! Matching a publish follows the exact child and the `+` child at every level of the
//! subscription index, so wildcard filters can make one publish visit tens of thousands of
//! index nodes under its routing shard's lock. The reviewer's construction: 1,872 filters of
//! 32 levels on key id K (the most one tenant's default quota holds) — for filter `i`,
//! level `j < 11` is `+` if bit `j` of `i` is set, else `p_j`; levels 11..=30 `+`; level 31
//! a token `Z` no publish uses — make a publish on `P = [K, p_0 .. p_31]` visit 41,359
//! nodes and match none of them. The publisher pays one publish rate token per 64 nodes
//! beyond its publish's own one (`rate::walk_tokens`), and its connection leaves the light
//! runtime (`hop::WALK_TOKENS_TO_MOVE`). Observed through the metrics, never through time.

mod common;

use common::wildcard::metric;
use common::wildcard::*;
use common::*;
use whispeer_protocol::ErrorCode;
use whispeer_relay::Config;

const HONEST: u8 = 3;

/// The attacker's 1,872 filters on K (two connections, `max_subscriptions` 1,000 each;
/// the tenant's byte quota refuses a 1,873rd), an honest tenant subscribed to P exactly and
/// to a path of its own key id, and publishers. A publish on P is charged 646 tokens
/// beyond its own (41,391 nodes: the construction's 41,359 and the honest exact filter's
/// 32); an honest publish none. The expensive publisher goes into debt on its second publish
/// (publish_rate 1/s, burst 1,000: 1,000 − 647 − 647 < 0) and its reads pause; it leaves the
/// light runtime for its walks; the honest tenant gets every message meant for it —
/// including both publishes on P, which the construction did not make the relay miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_walk_is_charged_to_its_publisher_and_honest_deliveries_go_on() {
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 1;
    config.limits.publish_burst = 1000;
    // The light runtime's busy guard off (as in light_runtime.rs): on a loaded machine it
    // would start the expensive publisher on the main runtime, with nothing to move.
    config.runtime.light_busy_percent = 0;
    let relay = TestRelay::start(config).await;

    let mut attackers = construction(&relay).await;
    // The construction is all the tenant's quota holds (17,920 bytes a 32-level filter,
    // 32 MiB): the next one is refused.
    attackers[1].send(&sub_frame(9999, filter(0))).await;
    let e = attackers[1].expect_err().await;
    assert_eq!(e.code, ErrorCode::TooManySubscriptions, "{e:?}");

    let path: Vec<u8> = (0..32).collect();
    let mut honest = greeted(&relay, "127.0.0.2").await;
    honest.subscribe(1, exact(K, &path)).await;
    honest.subscribe(2, exact(HONEST, &[1])).await;

    // An honest publish: no walk charge.
    let mut honest_pub = greeted(&relay, "127.0.0.4").await;
    let before = metric(&relay, "whispeer_relay_walk_tokens_total");
    honest_pub.publish(envelope(HONEST, &[1])).await;
    assert_eq!(honest.expect_msg().await.envelope, envelope(HONEST, &[1]));
    assert_eq!(
        metric(&relay, "whispeer_relay_walk_tokens_total"),
        before,
        "an honest publish is charged its one token"
    );

    // The expensive publisher, on an address of its own: it starts light (the busy guard
    // is off), and its first walk moves it to the main runtime.
    let started = metric(&relay, "whispeer_relay_light_started_total");
    let mut expensive = greeted(&relay, "127.0.0.3").await;
    assert_eq!(
        metric(&relay, "whispeer_relay_light_started_total"),
        started + 1,
        "the expensive publisher starts on the light runtime"
    );
    let walks = metric(&relay, "whispeer_relay_route_nodes_visited_count");
    let big = metric(
        &relay,
        "whispeer_relay_route_nodes_visited_bucket{le=\"65536\"}",
    ) - metric(
        &relay,
        "whispeer_relay_route_nodes_visited_bucket{le=\"16384\"}",
    );
    expensive.publish(envelope_sized(K, &path, 64)).await;
    assert_eq!(honest.expect_msg().await.envelope, envelope(K, &path));
    metric_reaches(&relay, "whispeer_relay_walk_tokens_total", before + 646).await;
    assert_eq!(
        metric(&relay, "whispeer_relay_walk_tokens_total"),
        before + 646,
        "41,391 nodes / 64"
    );
    assert_eq!(
        metric(&relay, "whispeer_relay_route_nodes_visited_count"),
        walks + 1
    );
    assert_eq!(
        metric(
            &relay,
            "whispeer_relay_route_nodes_visited_bucket{le=\"65536\"}"
        ) - metric(
            &relay,
            "whispeer_relay_route_nodes_visited_bucket{le=\"16384\"}"
        ),
        big + 1,
        "the walk is in the 16,384..65,536 bucket"
    );
    metric_reaches(
        &relay,
        "whispeer_relay_light_moves_total{cause=\"walking\"}",
        1,
    )
    .await;
    // Not yet slowed: the burst held the first one.
    assert_eq!(metric(&relay, "whispeer_relay_throttled_total"), 0);

    // The second takes the connection into debt: its reads pause (backpressure).
    expensive.publish(envelope(K, &path)).await;
    assert_eq!(honest.expect_msg().await.envelope, envelope(K, &path));
    metric_reaches(&relay, "whispeer_relay_throttled_total", 1).await;
    assert_eq!(
        metric(&relay, "whispeer_relay_walk_tokens_total"),
        before + 2 * 646
    );

    // The honest tenant's deliveries go on meanwhile.
    honest_pub.publish(envelope(HONEST, &[1])).await;
    assert_eq!(honest.expect_msg().await.envelope, envelope(HONEST, &[1]));
    assert_eq!(
        metric(&relay, "whispeer_relay_walk_tokens_total"),
        before + 2 * 646
    );

    drop((attackers, honest, honest_pub, expensive));
    relay.stop().await;
}

/// The walk is charged to the publisher's address too (`addr_publish_rate`), not only to
/// its connection (README: "taken from the connection's, the address's and the account's
/// publish buckets"), so opening connections does not buy more walks. With the
/// per-connection rate off, two connections of one address publish once each on P: the
/// first takes 647 of the address's 1,000 tokens and nothing pauses; the second, on a
/// connection of its own, takes the address into debt and its reads pause. Charged to the
/// connection only, nothing would ever pause here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_walk_is_charged_to_its_publishers_address() {
    let mut config = Config::ephemeral();
    config.limits.publish_rate = 0;
    config.limits.addr_publish_rate = 1;
    config.limits.addr_publish_burst = 1000;
    config.runtime.light_busy_percent = 0;
    let relay = TestRelay::start(config).await;
    let attackers = construction(&relay).await;
    let path: Vec<u8> = (0..32).collect();
    let before = metric(&relay, "whispeer_relay_walk_tokens_total");

    let mut first = greeted(&relay, "127.0.0.3").await;
    first.publish(envelope(K, &path)).await;
    metric_reaches(&relay, "whispeer_relay_walk_tokens_total", before + 646).await;
    assert_eq!(
        metric(&relay, "whispeer_relay_throttled_total"),
        0,
        "the address's burst held the first walk"
    );

    let mut second = greeted(&relay, "127.0.0.3").await;
    second.publish(envelope(K, &path)).await;
    metric_reaches(&relay, "whispeer_relay_walk_tokens_total", before + 2 * 646).await;
    metric_reaches(&relay, "whispeer_relay_throttled_total", 1).await;

    drop((attackers, first, second));
    relay.stop().await;
}

/// The walk is charged to the publisher's account too (README: "taken from the
/// connection's, the address's and the account's publish buckets"), so an account's
/// connections on many addresses do not buy more walks. Auth required, the per-connection
/// and per-address publish rates off, the account's 1/s with a burst of 1,000: another
/// account of the group builds the construction, and the publisher's account publishes
/// once on P from each of two addresses. The first takes 647 tokens and nothing pauses;
/// the second takes the account into debt and its reads pause. Charged to the connection
/// and the address only, nothing would ever pause here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_walk_is_charged_to_its_publishers_account() {
    let dir = temp_dir("walk-account");
    let file = dir.join("accounts.toml");
    let token = |name: &str| {
        let out = account_add(&file, name, &["--token", "--group", "walk"]);
        out.trim().lines().last().unwrap().to_string()
    };
    let (builder, publisher) = (token("builder"), token("publisher"));
    let mut config = Config::ephemeral();
    config.auth.mode = whispeer_relay::config::AuthMode::Required;
    config.auth.accounts = Some(file);
    config.limits.publish_rate = 0;
    config.limits.addr_publish_rate = 0;
    config.limits.account_publish_rate = 1;
    config.limits.account_publish_burst = 1000;
    config.runtime.light_busy_percent = 0;
    let relay = TestRelay::start(config).await;
    let mut attackers = [
        Client::token_login_from(relay.tcp(), "127.0.0.1", &builder, 0).await,
        Client::token_login_from(relay.tcp(), "127.0.0.1", &builder, 0).await,
    ];
    let half = FILTERS / 2;
    subscribe_all(&mut attackers[0], 0..half).await;
    subscribe_all(&mut attackers[1], half..FILTERS).await;
    let path: Vec<u8> = (0..32).collect();
    let before = metric(&relay, "whispeer_relay_walk_tokens_total");

    let mut first = Client::token_login_from(relay.tcp(), "127.0.0.3", &publisher, 0).await;
    first.publish(envelope(K, &path)).await;
    metric_reaches(&relay, "whispeer_relay_walk_tokens_total", before + 646).await;
    assert_eq!(
        metric(&relay, "whispeer_relay_throttled_total"),
        0,
        "the account's burst held the first walk"
    );

    let mut second = Client::token_login_from(relay.tcp(), "127.0.0.4", &publisher, 0).await;
    second.publish(envelope(K, &path)).await;
    metric_reaches(&relay, "whispeer_relay_walk_tokens_total", before + 2 * 646).await;
    metric_reaches(&relay, "whispeer_relay_throttled_total", 1).await;

    drop((attackers, first, second));
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
