//! The routing walk's cost over the review's wildcard construction (relay README, "routing
//! cost of wildcard filters"; `rate::NODES_PER_TOKEN` is chosen from it): a publish on the
//! construction's path walks 41,359 index nodes and matches none, where a plain publish on
//! a 4-level path walks a handful. Prints nanoseconds per walk and per node, release build:
//! `cargo bench -p whispeer-relay --bench walk`. A measurement: no threshold.

use std::time::Instant;

use whispeer_relay::index::SubIndex;
use whispeer_relay::protocol::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};
use whispeer_relay::{ConnId, SubId};

#[path = "../tests/common/construction.rs"]
mod construction;

fn t(b: u8) -> TopicToken {
    TopicToken::from_bytes([b; 16])
}

/// Mean time of `rounds` walks over `path`, and the nodes one walk visits.
fn time(ix: &SubIndex<u32>, path: &TokenPath, rounds: u32) -> (f64, usize) {
    let mut matched = 0usize;
    let mut visited = 0;
    let start = Instant::now();
    for _ in 0..rounds {
        visited = ix.for_each_match(path, |_, _| matched += 1);
    }
    std::hint::black_box(matched);
    (
        start.elapsed().as_nanos() as f64 / f64::from(rounds),
        visited,
    )
}

fn main() {
    let k = KeyId::from_bytes([9; 16]);
    let mut ix = SubIndex::new();
    for i in 0..construction::FILTERS {
        let elems = construction::levels(i)
            .into_iter()
            .map(|l| l.map_or(PatternElem::One, |b| PatternElem::Token(t(b))))
            .collect();
        let p = TokenPattern::new(k, elems).expect("valid filter");
        ix.insert(&p, ConnId(u64::from(i % 2)), SubId(u64::from(i)), i);
    }
    let attack =
        TokenPath::new(k, construction::path().into_iter().map(t).collect()).expect("path");
    // A plain publish: an exact subscriber on another key id, 4 levels.
    let other = KeyId::from_bytes([1; 16]);
    let plain_levels: Vec<TopicToken> = (1..=4).map(t).collect();
    let exact = TokenPattern::new(
        other,
        plain_levels
            .iter()
            .map(|x| PatternElem::Token(*x))
            .collect(),
    )
    .expect("valid filter");
    ix.insert(&exact, ConnId(9), SubId(9), 0);
    let plain = TokenPath::new(other, plain_levels).expect("path");
    time(&ix, &attack, 200);
    let (ns, visited) = time(&ix, &attack, 2_000);
    println!(
        "walk over the construction: {visited} nodes, {:.1} us a publish, {:.2} ns a node",
        ns / 1000.0,
        ns / visited as f64
    );
    let (ns, visited) = time(&ix, &plain, 2_000_000);
    println!("walk of a plain 4-level publish: {visited} nodes, {ns:.1} ns a publish");
}
