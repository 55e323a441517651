//! The one in-memory cache type: a sharded LRU of immutable values, bounded by bytes.
//!
//! Every table, bitmap, grain, chunk and merged block map that vdiskfs keeps in memory lives in a
//! [`ByteCache`], so every bound is stated in bytes in one way. A shard's lock is held only for
//! the lookup or the insert, never while the value is computed or read from a source: two
//! threads missing the same key may both load it, which is harmless because values are
//! immutable. (One fetch shared by every waiter is the remote chunk cache's job, where a miss
//! costs a round trip.)

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

/// What a cached value costs in memory.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl<T> Weigh for Arc<[T]> {
    fn weight(&self) -> usize {
        std::mem::size_of_val::<[T]>(self)
    }
}

/// Bookkeeping per entry (the LRU node, the key, the Arc header), counted against the bound.
const OVERHEAD: usize = 64;

struct Shard<K: Hash + Eq, V> {
    lru: LruCache<K, V>,
    bytes: usize,
}

/// A byte-bounded, sharded LRU. Values are cheap to clone (`Arc`s).
pub struct ByteCache<K: Hash + Eq, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    max_bytes_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq, V> std::fmt::Debug for ByteCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteCache")
            .field("shards", &self.shards.len())
            .field("max_bytes", &(self.max_bytes_per_shard * self.shards.len()))
            .finish()
    }
}

impl<K: Hash + Eq, V: Clone + Weigh> ByteCache<K, V> {
    /// A cache of at most `max_bytes`, in one shard (for caches touched by few threads).
    pub fn new(max_bytes: usize) -> Self {
        Self::sharded(max_bytes, 1)
    }

    /// A cache of at most `max_bytes` spread over `shards` locks (for the hot read path).
    /// At least one entry per shard is always kept, whatever its size.
    pub fn sharded(max_bytes: usize, shards: usize) -> Self {
        let n = shards.max(1);
        ByteCache {
            shards: (0..n).map(|_| Mutex::new(Shard { lru: LruCache::unbounded(), bytes: 0 })).collect(),
            max_bytes_per_shard: (max_bytes / n).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, k: &K) -> &Mutex<Shard<K, V>> {
        if self.shards.len() == 1 {
            return &self.shards[0];
        }
        &self.shards[(self.hasher.hash_one(k) % self.shards.len() as u64) as usize]
    }

    pub fn get(&self, k: &K) -> Option<V> {
        self.shard(k).lock().lru.get(k).cloned()
    }

    /// Inserts `v` under `k`, then evicts the least recently used entries over the bound.
    pub fn insert(&self, k: K, v: V) {
        let w = v.weight() + OVERHEAD;
        let mut s = self.shard(&k).lock();
        if let Some(old) = s.lru.put(k, v) {
            s.bytes -= old.weight() + OVERHEAD;
        }
        s.bytes += w;
        while s.bytes > self.max_bytes_per_shard && s.lru.len() > 1 {
            match s.lru.pop_lru() {
                Some((_, old)) => s.bytes -= old.weight() + OVERHEAD,
                None => break,
            }
        }
    }

    /// The cached value, or `load()`'s, cached. `load` runs without any lock held.
    pub fn get_or_load<E>(&self, k: K, load: impl FnOnce() -> Result<V, E>) -> Result<V, E>
    where
        K: Clone,
    {
        if let Some(v) = self.get(&k) {
            return Ok(v);
        }
        let v = load()?;
        self.insert(k, v.clone());
        Ok(v)
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().lru.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes currently accounted (values plus per-entry overhead).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(n: usize) -> Arc<[u8]> {
        vec![0u8; n].into()
    }

    #[test]
    fn evicts_least_recently_used_past_the_byte_bound() {
        let c: ByteCache<u32, Arc<[u8]>> = ByteCache::new(3 * (100 + OVERHEAD));
        c.insert(1, buf(100));
        c.insert(2, buf(100));
        c.insert(3, buf(100));
        assert!(c.get(&1).is_some()); // 1 is now the most recent
        c.insert(4, buf(100));
        assert!(c.get(&2).is_none(), "2 was least recently used");
        assert!(c.get(&1).is_some() && c.get(&3).is_some() && c.get(&4).is_some());
        assert!(c.bytes() <= 3 * (100 + OVERHEAD));
    }

    #[test]
    fn keeps_one_oversized_entry_and_replaces_in_place() {
        let c: ByteCache<u32, Arc<[u8]>> = ByteCache::new(10);
        c.insert(1, buf(1000));
        assert_eq!(c.len(), 1);
        c.insert(1, buf(10));
        assert_eq!(c.bytes(), 10 + OVERHEAD);
    }

    #[test]
    fn sharded_bound_holds_across_shards() {
        let c: ByteCache<u64, Arc<[u8]>> = ByteCache::sharded(16 * 4096, 16);
        for k in 0..10_000 {
            c.insert(k, buf(1000));
        }
        assert!(c.bytes() <= 16 * 4096 + 16 * (1000 + OVERHEAD), "{}", c.bytes());
        let r: Result<Arc<[u8]>, ()> = c.get_or_load(123_456, || Ok(buf(7)));
        assert_eq!(r.unwrap().len(), 7);
        assert_eq!(c.get(&123_456).unwrap().len(), 7);
    }
}
