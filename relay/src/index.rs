//! The subscription index: a trie keyed by [`KeyId`], then one level per [`TopicToken`],
//! with a `+` branch and a `#` slot at every node.
//!
//! Matching a message walks at most two branches per level (the exact token and `+`), so
//! its cost grows with the number of *matching shapes*, not with the number of
//! subscriptions; 10,000 subscriptions on distinct paths cost one hash lookup per level.
//! `#` holds subscribers at the node of its parent level, which makes `a/#` match `a` itself
//! (MQTT semantics) and everything below it.

use std::collections::HashMap;

use whispeer_protocol::{KeyId, PatternElem, TokenPath, TokenPattern, TopicToken};

use crate::ids::{ConnId, SubId};

#[derive(Debug)]
struct Entry<V> {
    conn: ConnId,
    sub: SubId,
    value: V,
}

#[derive(Debug)]
struct Node<V> {
    exact: HashMap<TopicToken, Node<V>>,
    one: Option<Box<Node<V>>>,
    /// Subscriptions whose filter ends at this node.
    here: Vec<Entry<V>>,
    /// Subscriptions whose filter ends with `#` after this node.
    rest: Vec<Entry<V>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            one: None,
            here: Vec::new(),
            rest: Vec::new(),
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

    /// Calls `f` once per matching subscription (a connection with several matching
    /// subscriptions is seen several times; the router deduplicates).
    pub fn for_each_match<'a>(&'a self, path: &TokenPath, mut f: impl FnMut(ConnId, &'a V)) {
        if let Some(root) = self.roots.get(path.key_id()) {
            walk(root, path.tokens(), &mut f);
        }
    }
}

fn find<'a, V>(node: &'a Node<V>, elems: &[PatternElem]) -> Option<&'a [Entry<V>]> {
    match elems.split_first() {
        None => Some(&node.here),
        Some((PatternElem::Rest, _)) => Some(&node.rest),
        Some((PatternElem::Token(t), tail)) => find(node.exact.get(t)?, tail),
        Some((PatternElem::One, tail)) => find(node.one.as_deref()?, tail),
    }
}

fn walk<'a, V>(node: &'a Node<V>, rest: &[TopicToken], f: &mut impl FnMut(ConnId, &'a V)) {
    for e in &node.rest {
        f(e.conn, &e.value);
    }
    let Some((first, tail)) = rest.split_first() else {
        for e in &node.here {
            f(e.conn, &e.value);
        }
        return;
    };
    if let Some(child) = node.exact.get(first) {
        walk(child, tail, f);
    }
    if let Some(child) = &node.one {
        walk(child, tail, f);
    }
}

fn remove_in<V>(node: &mut Node<V>, elems: &[PatternElem], conn: ConnId, sub: SubId) -> Option<V> {
    let take = |v: &mut Vec<Entry<V>>| {
        v.iter()
            .position(|e| e.conn == conn && e.sub == sub)
            .map(|i| v.swap_remove(i).value)
    };
    match elems.split_first() {
        None => take(&mut node.here),
        Some((PatternElem::Rest, _)) => take(&mut node.rest),
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

#[cfg(test)]
mod tests {
    use super::*;
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

    proptest! {
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
