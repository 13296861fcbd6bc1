//! Token buckets for the client-facing rate limits (`[rate_limits]`, the v2 SEND bucket, the
//! relay bucket) and the bounded per-key tables the shards keep them in.
//!
//! A bucket holds at most `burst` tokens and gains `rate` per second; each action takes one. A
//! rate of 0 means no limit. Buckets live on one shard and are never shared: a user's sessions
//! on different shards each have their own per-user bucket, so a user spread over `n` shards
//! gets up to `n` times the per-user rate (documented in docs/CONFIG.md).

use std::borrow::Borrow;
use std::hash::Hash;
use std::time::Instant;

use crate::bounded::BoundedLru;

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token: `Ok`, or `Err(ms)` until the next token (at least 1). `rate` 0 never
    /// limits.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), u32> {
        if rate == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(rate), f64::from(burst.max(1)));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - self.tokens) / rate * 1000.0).ceil();
        Err((wait_ms as u32).max(1))
    }
}

/// Buckets by key (a user, a source address), at most `max` of them, in the order they were
/// last used. A new key when the table is full forgets the least recently used bucket: the one
/// with the oldest last take, so the most likely to have refilled (it would start full anyway).
/// If even that one has not, forgetting it can only let its key through early (a fresh full
/// bucket), never refuse one. Every take is O(1): no sweep of the table.
#[derive(Debug)]
pub struct Buckets<K: Hash + Eq> {
    map: BoundedLru<K, TokenBucket>,
}

impl<K: Hash + Eq> Buckets<K> {
    pub fn new(max: usize) -> Self {
        Self {
            map: BoundedLru::new(max.max(1)),
        }
    }

    /// Takes one token from `key`'s bucket (created full). The key is copied only when its
    /// bucket is created.
    pub fn take<Q>(&mut self, key: &Q, rate: u32, burst: u32, now: Instant) -> Result<(), u32>
    where
        K: Borrow<Q> + From<Q::Owned>,
        Q: Hash + Eq + ToOwned + ?Sized,
    {
        if rate == 0 {
            return Ok(());
        }
        if let Some(b) = self.map.get_mut(key) {
            return b.take(rate, burst, now);
        }
        let mut b = TokenBucket::full(burst, now);
        let r = b.take(rate, burst, now);
        self.map.insert(K::from(key.to_owned()), b);
        r
    }

    /// Keys with a bucket (tests check the bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        for _ in 0..3 {
            assert_eq!(b.take(10, 3, t0), Ok(()));
        }
        assert_eq!(b.take(10, 3, t0), Err(100));
        // 10 per second: one more token after 100 ms, not before.
        assert!(b.take(10, 3, t0 + Duration::from_millis(50)).is_err());
        assert_eq!(b.take(10, 3, t0 + Duration::from_millis(100)), Ok(()));
        // Never above the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.take(10, 3, later), Ok(()));
        }
        assert!(b.take(10, 3, later).is_err());
    }

    #[test]
    fn rate_zero_never_limits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(0, t0);
        for _ in 0..10_000 {
            assert_eq!(b.take(0, 0, t0), Ok(()));
        }
    }

    /// A key that keeps taking stays in a full table (and stays limited) however many other
    /// keys pass through it; the table never holds more than its bound.
    #[test]
    fn tables_stay_bounded_and_keep_limiting_the_busy_key() {
        let t0 = Instant::now();
        let mut m: Buckets<u32> = Buckets::new(100);
        for _ in 0..5 {
            assert!(m.take(&7, 1, 5, t0).is_ok());
        }
        assert!(m.take(&7, 1, 5, t0).is_err());
        let t1 = t0 + Duration::from_millis(1);
        for k in 1000..5000 {
            assert!(m.take(&k, 1, 5, t1).is_ok(), "a new key starts full");
            assert!(
                m.take(&7, 1, 5, t1).is_err(),
                "the busy key is forgotten at {k}"
            );
            assert!(m.len() <= 100, "{}", m.len());
        }
        assert_eq!(m.len(), 100);
    }

    /// A new key in a full table forgets the least recently used bucket, not one in use.
    #[test]
    fn a_full_table_forgets_the_least_recently_used_bucket() {
        let t0 = Instant::now();
        let mut m: Buckets<Box<[u8]>> = Buckets::new(3);
        for user in [&b"a"[..], b"b", b"c"] {
            assert!(m.take(user, 1, 1, t0).is_ok());
            assert!(m.take(user, 1, 1, t0).is_err());
        }
        // `a` is used again (refused): `b` is now the least recently used.
        assert!(m.take(&b"a"[..], 1, 1, t0).is_err());
        assert!(m.take(&b"d"[..], 1, 1, t0).is_ok());
        assert_eq!(m.len(), 3);
        assert!(m.take(&b"a"[..], 1, 1, t0).is_err(), "a kept");
        assert!(m.take(&b"c"[..], 1, 1, t0).is_err(), "c kept");
        assert!(m.take(&b"d"[..], 1, 1, t0).is_err(), "d kept");
        // `b` was forgotten: it starts full again (let through early, never refused).
        assert!(m.take(&b"b"[..], 1, 1, t0).is_ok(), "b forgotten");
    }
}
