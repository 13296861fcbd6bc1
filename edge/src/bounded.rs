//! [`BoundedLru`]: a map of at most `max` entries that forgets the least recently used one to
//! make room, growing as entries come (the `lru` crate's own bound would allocate room for all
//! of them at once). The shard's per-key tables use it: the rate-limit buckets
//! (`ratelimit.rs`) and the presence owner's last-seen times (`shard/presence.rs`).

use std::borrow::Borrow;
use std::hash::Hash;

/// At most `max` entries (0: none kept), the least recently used forgotten first.
#[derive(Debug)]
pub struct BoundedLru<K: Hash + Eq, V> {
    map: lru::LruCache<K, V, foldhash::fast::RandomState>,
    max: usize,
}

impl<K: Hash + Eq, V> BoundedLru<K, V> {
    pub fn new(max: usize) -> Self {
        Self {
            map: lru::LruCache::unbounded_with_hasher(foldhash::fast::RandomState::default()),
            max,
        }
    }

    /// `key`'s value, now the most recently used.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get_mut(key)
    }

    /// `key`'s value, its place in the order unchanged.
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.peek(key)
    }

    /// `key`'s value to change, its place in the order unchanged.
    pub fn peek_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.peek_mut(key)
    }

    /// Inserts `key` (absent) as the most recently used, forgetting the least recently used
    /// entry when the map is full.
    pub fn insert(&mut self, key: K, value: V) {
        if self.max == 0 {
            return;
        }
        while self.map.len() >= self.max {
            self.map.pop_lru();
        }
        self.map.push(key, value);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entry_makes_room() {
        let mut m: BoundedLru<u32, u32> = BoundedLru::new(2);
        m.insert(1, 10);
        m.insert(2, 20);
        *m.get_mut(&1).unwrap() += 1; // 2 is now the least recently used
        assert_eq!(m.peek(&2), Some(&20)); // a peek does not change that
        m.insert(3, 30);
        assert_eq!(
            (m.len(), m.peek(&1), m.peek(&2), m.peek(&3)),
            (2, Some(&11), None, Some(&30))
        );
        let mut none: BoundedLru<u32, u32> = BoundedLru::new(0);
        none.insert(1, 1);
        assert!(none.is_empty());
    }
}
