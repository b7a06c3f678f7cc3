//! The subscription index: a trie keyed by [`KeyId`], then one level per [`TopicToken`],
//! with a `+` branch and a `#` slot at every node.
//!
//! Matching a message walks at most two branches per level (the exact token and `+`), so
//! its cost grows with the number of *matching shapes*, not with the number of
//! subscriptions; 10,000 subscriptions on distinct paths cost one hash lookup per level.
//! `#` holds subscribers at the node of its parent level, which makes `a/#` match `a` itself
//! (MQTT semantics) and everything below it.
//!
//! The walk's cost is the nodes it visits: every node whose filter prefix matches the
//! path's prefix of the same length, each once — at most the nodes of the key id's trie,
//! whatever the filters. Wildcards make that large without any delivery: one tenant's
//! default quota (32 MiB at 512 + 544 bytes a level: 1,872 filters of 32 levels) holds the
//! review's construction (`tests/common/construction.rs`), on which a publish visits
//! 41,359 nodes and matches nothing — 235–243 µs in a release build (5.7–5.9 ns a node;
//! `cargo bench -p whispeer-relay --bench walk`), under the
//! routing shard's lock. Several tenants on one key id add up, bounded by the relay's
//! `total_subscription_bytes` alone (1 GiB: 59,918 filters of 32 levels, at most ~1.9 M
//! nodes, ~11 ms). [`SubIndex::for_each_match`] therefore returns the count, and the
//! publisher pays for it in publish rate tokens
//! (`rate::walk_tokens`, one per 64 nodes: about the lock time a plain publish takes), so
//! an expensive publisher gets the lock time a plain-publish flood at its rate would, and
//! nobody else's routing pays for its filters. Chosen over capping wildcard filters (quota
//! cost per `+`, or wildcard nodes per key id): a cap low enough to bound the walk refuses
//! realistic `+` sets, and with auth off anyone could fill a key id's cap; and over walking
//! off the lock, which orders a key id's sequences against new subscriptions (`router`).

use std::collections::HashMap;

use whispeer_protocol::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};

use crate::ids::{ConnId, SubId};

#[derive(Debug)]
struct Entry<V> {
    conn: ConnId,
    sub: SubId,
    value: V,
}

/// A slot holding more entries than this keeps a map of their positions, so removing one
/// is O(1) instead of a scan; a small slot (the usual case: a filter shared by few
/// subscriptions) is scanned, at most this many comparisons, and costs no map.
const INDEXED_ABOVE: usize = 16;

/// The subscriptions with one filter. Routing iterates `entries`, a contiguous `Vec`; the
/// position map (large slots only) serves removal alone. Without it, unsubscribing from a
/// filter shared by n subscriptions scanned them all under the routing lock: a connection
/// closing with 1,000 subscriptions among 10,000 identical ones cost ~5 million
/// comparisons.
#[derive(Debug)]
struct Slot<V> {
    entries: Vec<Entry<V>>,
    /// Where each `(conn, sub)` is in `entries`, while there are more than
    /// [`INDEXED_ABOVE`] (dropped again at half that, so a slot near the threshold does
    /// not rebuild it on every change).
    /// Boxed on purpose: one pointer in every slot (a node has two) instead of an empty
    /// map's 48 bytes; most slots never have a map.
    #[allow(clippy::box_collection)]
    at: Option<Box<HashMap<(ConnId, SubId), usize>>>,
}

impl<V> Default for Slot<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            at: None,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Entries compared by removals on this thread (tests count work, not time).
    static COMPARED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl<V> Slot<V> {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, Entry<V>> {
        self.entries.iter()
    }

    fn push(&mut self, entry: Entry<V>) {
        if let Some(at) = &mut self.at {
            at.insert((entry.conn, entry.sub), self.entries.len());
        }
        self.entries.push(entry);
        if self.at.is_none() && self.entries.len() > INDEXED_ABOVE {
            let at = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| ((e.conn, e.sub), i))
                .collect();
            self.at = Some(Box::new(at));
        }
    }

    fn take(&mut self, conn: ConnId, sub: SubId) -> Option<V> {
        let i = match &mut self.at {
            Some(at) => at.remove(&(conn, sub))?,
            None => {
                let i = self.entries.iter().position(|e| {
                    #[cfg(test)]
                    COMPARED.with(|c| c.set(c.get() + 1));
                    e.conn == conn && e.sub == sub
                });
                i?
            }
        };
        let removed = self.entries.swap_remove(i);
        if let Some(at) = &mut self.at {
            if self.entries.len() <= INDEXED_ABOVE / 2 {
                self.at = None;
            } else if let Some(moved) = self.entries.get(i) {
                at.insert((moved.conn, moved.sub), i);
            }
        }
        Some(removed.value)
    }
}

#[derive(Debug)]
struct Node<V> {
    exact: HashMap<TopicToken, Node<V>>,
    one: Option<Box<Node<V>>>,
    /// Subscriptions whose filter ends at this node.
    here: Slot<V>,
    /// Subscriptions whose filter ends with `#` after this node.
    rest: Slot<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            one: None,
            here: Slot::default(),
            rest: Slot::default(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.one.is_none() && self.here.is_empty() && self.rest.is_empty()
    }
}

/// Subscriptions by pattern; `V` is what a match yields (the connection's outbound queue).
#[derive(Debug)]
pub struct SubIndex<V> {
    roots: HashMap<KeyId, Node<V>>,
    len: usize,
}

impl<V> Default for SubIndex<V> {
    fn default() -> Self {
        Self {
            roots: HashMap::new(),
            len: 0,
        }
    }
}

impl<V> SubIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no subscription is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a subscription. The caller guarantees `(conn, sub)` is not already present
    /// (connections remove a subscription before replacing it).
    pub fn insert(&mut self, pattern: &TokenPattern, conn: ConnId, sub: SubId, value: V) {
        let mut node = self.roots.entry(*pattern.key_id()).or_default();
        let mut slot_rest = false;
        for elem in pattern.elems() {
            match elem {
                PatternElem::Token(t) => node = node.exact.entry(*t).or_default(),
                PatternElem::One => node = node.one.get_or_insert_with(Box::default),
                PatternElem::Rest => {
                    slot_rest = true;
                    break;
                }
            }
        }
        let entry = Entry { conn, sub, value };
        if slot_rest {
            node.rest.push(entry);
        } else {
            node.here.push(entry);
        }
        self.len += 1;
    }

    /// Removes a subscription; returns whether it was present. Empty nodes are pruned.
    pub fn remove(&mut self, pattern: &TokenPattern, conn: ConnId, sub: SubId) -> bool {
        self.remove_value(pattern, conn, sub).is_some()
    }

    /// Removes a subscription and returns its value. Empty nodes are pruned.
    pub fn remove_value(&mut self, pattern: &TokenPattern, conn: ConnId, sub: SubId) -> Option<V> {
        let root = self.roots.get_mut(pattern.key_id())?;
        let removed = remove_in(root, pattern.elems(), conn, sub);
        if removed.is_some() {
            self.len -= 1;
            if root.is_empty() {
                self.roots.remove(pattern.key_id());
            }
        }
        removed
    }

    /// Calls `f` once per subscription whose filter is exactly `pattern` (not the ones it
    /// matches or that match it).
    pub fn for_each_with_filter<'a>(
        &'a self,
        pattern: &TokenPattern,
        mut f: impl FnMut(ConnId, &'a V),
    ) {
        let found = self
            .roots
            .get(pattern.key_id())
            .and_then(|root| find(root, pattern.elems()));
        for e in found.unwrap_or_default() {
            f(e.conn, &e.value);
        }
    }

    /// Calls `f` once per subscription of key id `key_id`, whatever its filter.
    pub fn for_each_in_key<'a>(&'a self, key_id: &KeyId, mut f: impl FnMut(ConnId, &'a V)) {
        if let Some(root) = self.roots.get(key_id) {
            every(root, &mut f);
        }
    }

    /// Calls `f` once per matching subscription (a connection with several matching
    /// subscriptions is seen several times; the router deduplicates). Returns the nodes
    /// the walk visited — its cost, which the publisher is charged for (see the module
    /// documentation): a node is visited once per walk at most, so this is at most the
    /// number of nodes of the key id's trie.
    pub fn for_each_match<'a>(
        &'a self,
        path: &TokenPath,
        mut f: impl FnMut(ConnId, &'a V),
    ) -> usize {
        let mut visited = 0;
        if let Some(root) = self.roots.get(path.key_id()) {
            walk(root, path.tokens(), &mut f, &mut visited);
        }
        visited
    }
}

fn find<'a, V>(node: &'a Node<V>, elems: &[PatternElem]) -> Option<&'a [Entry<V>]> {
    match elems.split_first() {
        None => Some(&node.here.entries),
        Some((PatternElem::Rest, _)) => Some(&node.rest.entries),
        Some((PatternElem::Token(t), tail)) => find(node.exact.get(t)?, tail),
        Some((PatternElem::One, tail)) => find(node.one.as_deref()?, tail),
    }
}

fn every<'a, V>(node: &'a Node<V>, f: &mut impl FnMut(ConnId, &'a V)) {
    for e in node.here.iter().chain(node.rest.iter()) {
        f(e.conn, &e.value);
    }
    for child in node.exact.values().chain(node.one.as_deref()) {
        every(child, f);
    }
}

fn walk<'a, V>(
    node: &'a Node<V>,
    rest: &[TopicToken],
    f: &mut impl FnMut(ConnId, &'a V),
    visited: &mut usize,
) {
    *visited += 1;
    for e in node.rest.iter() {
        f(e.conn, &e.value);
    }
    let Some((first, tail)) = rest.split_first() else {
        for e in node.here.iter() {
            f(e.conn, &e.value);
        }
        return;
    };
    if let Some(child) = node.exact.get(first) {
        walk(child, tail, f, visited);
    }
    if let Some(child) = &node.one {
        walk(child, tail, f, visited);
    }
}

fn remove_in<V>(node: &mut Node<V>, elems: &[PatternElem], conn: ConnId, sub: SubId) -> Option<V> {
    match elems.split_first() {
        None => node.here.take(conn, sub),
        Some((PatternElem::Rest, _)) => node.rest.take(conn, sub),
        Some((PatternElem::Token(t), tail)) => {
            let child = node.exact.get_mut(t)?;
            let removed = remove_in(child, tail, conn, sub);
            if removed.is_some() && child.is_empty() {
                node.exact.remove(t);
            }
            removed
        }
        Some((PatternElem::One, tail)) => {
            let child = node.one.as_deref_mut()?;
            let removed = remove_in(child, tail, conn, sub);
            if removed.is_some() && child.is_empty() {
                node.one = None;
            }
            removed
        }
    }
}

/// The review's wildcard construction, shared with the integration tests and the walk
/// bench.
#[cfg(test)]
#[path = "../tests/common/construction.rs"]
mod construction_for_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use construction_for_tests as construction;
    use proptest::prelude::*;

    fn t(b: u8) -> TopicToken {
        TopicToken::from_bytes([b; 16])
    }
    const K: KeyId = KeyId::from_bytes([9; 16]);

    fn matches(ix: &SubIndex<u32>, path: &TokenPath) -> Vec<u32> {
        let mut v = Vec::new();
        ix.for_each_match(path, |_, x| v.push(*x));
        v.sort();
        v
    }

    #[test]
    fn insert_match_remove_prunes() {
        use PatternElem::*;
        let mut ix = SubIndex::new();
        let p1 = TokenPattern::new(K, vec![Token(t(1)), Rest]).unwrap();
        let p2 = TokenPattern::new(K, vec![One, Token(t(2))]).unwrap();
        ix.insert(&p1, ConnId(1), SubId(1), 1);
        ix.insert(&p2, ConnId(2), SubId(1), 2);
        let path = TokenPath::new(K, vec![t(1), t(2)]).unwrap();
        assert_eq!(matches(&ix, &path), vec![1, 2]);
        let parent = TokenPath::new(K, vec![t(1)]).unwrap();
        assert_eq!(matches(&ix, &parent), vec![1]);
        assert!(ix.remove(&p1, ConnId(1), SubId(1)));
        assert!(!ix.remove(&p1, ConnId(1), SubId(1)));
        assert!(ix.remove(&p2, ConnId(2), SubId(1)));
        assert!(ix.is_empty());
        assert!(ix.roots.is_empty());
    }

    #[test]
    fn every_subscription_of_a_key_id_is_found() {
        use PatternElem::*;
        let mut ix = SubIndex::new();
        let other = KeyId::from_bytes([8; 16]);
        let patterns = [
            TokenPattern::new(K, vec![Token(t(1)), Rest]).unwrap(),
            TokenPattern::new(K, vec![One, Token(t(2))]).unwrap(),
            TokenPattern::new(K, vec![Rest]).unwrap(),
            TokenPattern::new(K, vec![Token(t(1)), Token(t(2)), Token(t(3))]).unwrap(),
            TokenPattern::new(other, vec![Rest]).unwrap(),
        ];
        for (i, p) in patterns.iter().enumerate() {
            ix.insert(p, ConnId(i as u64), SubId(1), i);
        }
        let mut found = Vec::new();
        ix.for_each_in_key(&K, |_, v| found.push(*v));
        found.sort_unstable();
        assert_eq!(found, vec![0, 1, 2, 3]);
    }

    fn elem() -> impl Strategy<Value = PatternElem> {
        prop_oneof![
            (0u8..3).prop_map(|b| PatternElem::Token(t(b))),
            Just(PatternElem::One),
        ]
    }

    fn pattern() -> impl Strategy<Value = TokenPattern> {
        (prop::collection::vec(elem(), 0..4), any::<bool>(), 0u8..2).prop_filter_map(
            "non-empty",
            |(mut e, rest, k)| {
                if rest {
                    e.push(PatternElem::Rest);
                }
                TokenPattern::new(KeyId::from_bytes([k; 16]), e).ok()
            },
        )
    }

    fn path() -> impl Strategy<Value = TokenPath> {
        (prop::collection::vec(0u8..3, 1..5), 0u8..2).prop_map(|(v, k)| {
            TokenPath::new(KeyId::from_bytes([k; 16]), v.into_iter().map(t).collect()).unwrap()
        })
    }

    /// Every slot's position map (when it has one) names exactly its entries, each where
    /// it is; small slots have none, large ones do.
    fn check_slots<V>(node: &Node<V>) {
        for slot in [&node.here, &node.rest] {
            match &slot.at {
                Some(at) => {
                    assert!(slot.entries.len() > INDEXED_ABOVE / 2);
                    assert_eq!(at.len(), slot.entries.len());
                    for (i, e) in slot.entries.iter().enumerate() {
                        assert_eq!(at.get(&(e.conn, e.sub)), Some(&i));
                    }
                }
                None => assert!(slot.entries.len() <= INDEXED_ABOVE),
            }
        }
        for child in node.exact.values().chain(node.one.as_deref()) {
            check_slots(child);
        }
    }

    /// A connection closing with 1,000 subscriptions among 10,000 with one filter (10
    /// connections × 1,000) removes each without scanning the others: the work is counted
    /// (entries compared), not timed. With a scan it was ~5 million comparisons under the
    /// routing lock.
    #[test]
    fn removing_from_a_shared_filter_does_not_scan_it() {
        let mut ix = SubIndex::new();
        let p = TokenPattern::new(K, vec![PatternElem::Token(t(1))]).unwrap();
        for c in 0..10u64 {
            for s in 0..1000u64 {
                ix.insert(&p, ConnId(c), SubId(s), (c * 1000 + s) as u32);
            }
        }
        let before = COMPARED.with(|c| c.get());
        for s in 0..1000u64 {
            assert_eq!(
                ix.remove_value(&p, ConnId(3), SubId(s)),
                Some(3000 + s as u32)
            );
        }
        let compared = COMPARED.with(|c| c.get()) - before;
        assert!(
            compared <= 1000 * INDEXED_ABOVE,
            "{compared} entries compared to remove 1,000 subscriptions"
        );
        check_slots(&ix.roots[&K]);
        // Routing still sees exactly the 9,000 others.
        let path = TokenPath::new(K, vec![t(1)]).unwrap();
        let got = matches(&ix, &path);
        assert_eq!(got.len(), 9000);
        assert!(got.iter().all(|v| !(3000..4000).contains(v)));
        // Emptied, the slot drops its map and the trie is pruned.
        for c in (0..10u64).filter(|c| *c != 3) {
            for s in 0..1000u64 {
                assert!(ix.remove(&p, ConnId(c), SubId(s)));
            }
        }
        assert!(ix.roots.is_empty());
    }

    /// The reviewer's construction: 1,872 subscriptions of 32 levels on key id `K`. For
    /// subscription `i`, level `j < 11` is `+` if bit `j` of `i` is set, else `p_j`;
    /// levels 11..=30 are `+`; level 31 is a token `Z` no publish uses. Every prefix of
    /// every one of them matches the path `P = [K, p_0 .. p_31]`, and none of them matches
    /// `P` itself. Returns the index and `P`.
    fn reviewers_construction() -> (SubIndex<u32>, TokenPath, Vec<TokenPattern>) {
        let mut ix = SubIndex::new();
        let mut pats = Vec::new();
        for i in 0..construction::FILTERS {
            let elems = construction::levels(i)
                .into_iter()
                .map(|l| l.map_or(PatternElem::One, |b| PatternElem::Token(t(b))))
                .collect();
            let p = TokenPattern::new(K, elems).unwrap();
            ix.insert(&p, ConnId(u64::from(i % 2)), SubId(u64::from(i)), i);
            pats.push(p);
        }
        let path = TokenPath::new(K, construction::path().into_iter().map(t).collect()).unwrap();
        (ix, path, pats)
    }

    /// Nodes in a (sub)trie, itself included.
    fn nodes<V>(node: &Node<V>) -> usize {
        1 + node
            .exact
            .values()
            .chain(node.one.as_deref())
            .map(nodes)
            .sum::<usize>()
    }

    /// The reviewer's construction: a publish on `P` matches nothing and visits 41,359
    /// nodes — the root and every node whose filter prefix matches the same-length prefix
    /// of `P`, counted here independently of the trie (1 + 2,046 + 1,872 at levels 1..=11,
    /// 20 × 1,872 at 12..=31; the 1,872 level-32 nodes end in `Z` and are not entered).
    /// That count is what its publisher is charged for ([`crate::rate::walk_tokens`]: 646
    /// tokens beyond the publish's own one). A path that shares no prefix with the
    /// construction costs its own levels only.
    #[test]
    fn a_walk_reports_every_node_it_visits() {
        let (ix, path, pats) = reviewers_construction();
        let mut prefixes = std::collections::HashSet::new();
        for p in &pats {
            let elems = p.elems();
            for d in 1..=elems.len() {
                let fits = elems[..d]
                    .iter()
                    .zip(path.tokens())
                    .all(|(e, tok)| match e {
                        PatternElem::Token(x) => x == tok,
                        _ => true,
                    });
                if fits {
                    let key: Vec<Option<TopicToken>> = elems[..d]
                        .iter()
                        .map(|e| match e {
                            PatternElem::Token(x) => Some(*x),
                            _ => None,
                        })
                        .collect();
                    prefixes.insert(key);
                }
            }
        }
        let mut matched = 0;
        let visited = ix.for_each_match(&path, |_, _| matched += 1);
        assert_eq!(matched, 0, "no subscription of the construction matches P");
        assert_eq!(visited, 1 + prefixes.len());
        assert_eq!(visited, 41_359);
        assert!(visited <= nodes(&ix.roots[&K]));
        assert_eq!(crate::rate::walk_tokens(visited), 646);
        // An honest publish beside it, on a path none of whose tokens the construction
        // names: it still enters the construction's `+` branches, as deep as it goes.
        let honest = TokenPath::new(K, vec![t(99), t(98)]).unwrap();
        let visited = ix.for_each_match(&honest, |_, _| matched += 1);
        assert_eq!((matched, visited), (0, 3), "root, `+`, `+/+`");
        assert_eq!(crate::rate::walk_tokens(visited), 0);
        // Another key id: nothing to walk.
        let other = TokenPath::new(KeyId::from_bytes([1; 16]), vec![t(0)]).unwrap();
        assert_eq!(ix.for_each_match(&other, |_, _| matched += 1), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, u64, u64),
        Remove(usize, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..3, 0u64..6, 0u64..6).prop_map(|(p, c, s)| Op::Insert(p, c, s)),
            2 => (0usize..3, 0u64..6, 0u64..6).prop_map(|(p, c, s)| Op::Remove(p, c, s)),
        ]
    }

    proptest! {
        /// Random inserts and removals on a few shared filters (slots crossing the
        /// position map's thresholds both ways): every removal returns the value the model
        /// says, each slot's map stays exact, and routing sees exactly the model's
        /// subscriptions.
        #[test]
        fn shared_filters_stay_consistent_under_inserts_and_removals(
            ops in prop::collection::vec(op(), 0..400),
        ) {
            use PatternElem::*;
            let pats = [
                TokenPattern::new(K, vec![Token(t(1))]).unwrap(),
                TokenPattern::new(K, vec![Token(t(1)), Rest]).unwrap(),
                TokenPattern::new(K, vec![One]).unwrap(),
            ];
            let mut ix = SubIndex::new();
            // (conn, sub) -> (pattern, value): a connection's sub id is in one filter.
            let mut model: HashMap<(u64, u64), (usize, u32)> = HashMap::new();
            for (n, op) in ops.iter().enumerate() {
                match *op {
                    Op::Insert(p, c, s) => {
                        if let std::collections::hash_map::Entry::Vacant(v) = model.entry((c, s)) {
                            v.insert((p, n as u32));
                            ix.insert(&pats[p], ConnId(c), SubId(s), n as u32);
                        }
                    }
                    Op::Remove(p, c, s) => {
                        let want = match model.get(&(c, s)) {
                            Some(&(mp, v)) if mp == p => {
                                model.remove(&(c, s));
                                Some(v)
                            }
                            _ => None,
                        };
                        prop_assert_eq!(ix.remove_value(&pats[p], ConnId(c), SubId(s)), want);
                    }
                }
                prop_assert_eq!(ix.len(), model.len());
                if let Some(root) = ix.roots.get(&K) {
                    check_slots(root);
                }
            }
            for (p, pat) in pats.iter().enumerate() {
                let mut want: Vec<u32> = model.values().filter(|(mp, _)| *mp == p).map(|(_, v)| *v).collect();
                want.sort();
                let mut got = Vec::new();
                ix.for_each_with_filter(pat, |_, x| got.push(*x));
                got.sort();
                prop_assert_eq!(got, want);
            }
            let path = TokenPath::new(K, vec![t(1)]).unwrap();
            let mut want: Vec<u32> = model.values().map(|(_, v)| *v).collect();
            want.sort();
            prop_assert_eq!(matches(&ix, &path), want);
        }

        /// The trie agrees with the reference matcher of the protocol crate, and removing
        /// every subscription leaves it empty.
        #[test]
        fn trie_agrees_with_token_pattern_matches(
            pats in prop::collection::vec(pattern(), 0..12),
            paths in prop::collection::vec(path(), 1..12),
        ) {
            let mut ix = SubIndex::new();
            for (i, p) in pats.iter().enumerate() {
                ix.insert(p, ConnId(i as u64), SubId(0), i as u32);
            }
            for path in &paths {
                let want: Vec<u32> = pats.iter().enumerate()
                    .filter(|(_, p)| p.matches(path)).map(|(i, _)| i as u32).collect();
                prop_assert_eq!(matches(&ix, path), want);
                // A walk visits each node of its key id's trie at most once.
                let visited = ix.for_each_match(path, |_, _| {});
                let held = ix.roots.get(path.key_id()).map_or(0, nodes);
                prop_assert!(visited <= held, "{} visited of {}", visited, held);
            }
            // Exactly the subscriptions with an equal filter, for filters held or not.
            for probe in pats.iter().cloned().chain(paths.iter().map(|p| {
                TokenPattern::new(
                    *p.key_id(),
                    p.tokens().iter().map(|t| PatternElem::Token(*t)).collect(),
                ).unwrap()
            })) {
                let want: Vec<u32> = pats.iter().enumerate()
                    .filter(|(_, p)| **p == probe).map(|(i, _)| i as u32).collect();
                let mut got = Vec::new();
                ix.for_each_with_filter(&probe, |_, x| got.push(*x));
                got.sort();
                prop_assert_eq!(got, want);
            }
            for (i, p) in pats.iter().enumerate() {
                prop_assert!(ix.remove(p, ConnId(i as u64), SubId(0)));
            }
            prop_assert!(ix.roots.is_empty());
        }
    }
}
