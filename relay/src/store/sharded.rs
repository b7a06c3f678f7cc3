//! A hash map that never rehashes more than a small part of itself at once.
//!
//! The SQLite store's in-memory index (paths, key ids, tenants, the dedup window) is
//! updated by `append`, under its lock. A `HashMap` that grows doubles its table
//! and rehashes every entry in one go: at 100,000 token paths (an attacker invents one per
//! message) that took tens of milliseconds — page faults for the new table, SipHash of
//! every key — during which no message was routed (the hostile bench saw one 64 ms stall
//! of every connection per doubling). Split into [`SHARDS`] maps by a hash of the key, a
//! growth rehashes one shard, 1/64 of the entries; lookups cost one more hash.

use std::borrow::Borrow;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Maps per [`Sharded`] map.
pub(crate) const SHARDS: usize = 64;

/// A `HashMap` split into [`SHARDS`] maps by a keyed hash of the key.
pub(crate) struct Sharded<K, V> {
    pick: RandomState,
    shards: Box<[HashMap<K, V>]>,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            pick: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        // The top bits: the shard's own map uses another keyed hash.
        (self.pick.hash_one(k) >> 58) as usize % SHARDS
    }

    pub(crate) fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(k)].get(k)
    }

    pub(crate) fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(k);
        self.shards[i].get_mut(k)
    }

    pub(crate) fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.shard(&k);
        self.shards[i].insert(k, v)
    }

    pub(crate) fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(k);
        self.shards[i].remove(k)
    }

    pub(crate) fn entry(&mut self, k: K) -> Entry<'_, K, V> {
        let i = self.shard(&k);
        self.shards[i].entry(k)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    /// The entries of shard `i` (of [`SHARDS`]): a long pass can take the map's lock once
    /// per shard instead of once for everything.
    pub(crate) fn shard_iter(&self, i: usize) -> impl Iterator<Item = (&K, &V)> {
        self.shards.get(i).into_iter().flat_map(HashMap::iter)
    }
}

impl<'a, K: Hash + Eq, V> IntoIterator for &'a Sharded<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_one_map() {
        let mut m: Sharded<Vec<u8>, u64> = Sharded::default();
        for i in 0..10_000u64 {
            assert_eq!(m.insert(i.to_le_bytes().to_vec(), i), None);
        }
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(&5u64.to_le_bytes()[..]), Some(&5));
        *m.get_mut(&7u64.to_le_bytes()[..]).unwrap() += 1;
        assert_eq!(m.get(&7u64.to_le_bytes()[..]), Some(&8));
        *m.entry(9u64.to_le_bytes().to_vec()).or_default() += 1;
        assert_eq!(m.remove(&9u64.to_le_bytes()[..]), Some(10));
        assert_eq!(m.get(&9u64.to_le_bytes()[..]), None);
        assert_eq!(m.iter().count(), 9_999);
        // The shards, one by one, are the whole map.
        let by_shard: usize = (0..SHARDS).map(|i| m.shard_iter(i).count()).sum();
        assert_eq!(by_shard, 9_999);
        assert_eq!(m.shard_iter(SHARDS).count(), 0);
        assert_eq!(m.values().sum::<u64>(), (0..10_000u64).sum::<u64>() - 9 + 1);
        // Every shard is used, none holds much more than its share.
        let biggest = m.shards.iter().map(HashMap::len).max().unwrap();
        assert!(m.shards.iter().all(|s| !s.is_empty()));
        assert!(biggest < 10_000 / SHARDS * 2, "{biggest}");
    }
}
