//! Token buckets for the client-facing rate limits (`[rate_limits]`, the v2 SEND bucket, the
//! relay bucket) and the bounded per-key tables the shards keep them in.
//!
//! A bucket holds at most `burst` tokens and gains `rate` per second; each action takes one. A
//! rate of 0 means no limit. Buckets live on one shard and are never shared: a user's sessions
//! on different shards each have their own per-user bucket, so a user spread over `n` shards
//! gets up to `n` times the per-user rate (documented in docs/CONFIG.md).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

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

    /// Whether the bucket would be full again by `now` (its entry can be forgotten).
    fn refilled(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * f64::from(rate) >= f64::from(burst)
    }
}

/// Buckets by key (a user, a source address), at most `max` of them: when full, the buckets
/// that have refilled are forgotten (they would start full anyway); if none has, the older half
/// is, which can only let a forgotten key through early (a fresh full bucket), never refuse one.
#[derive(Debug)]
pub struct Buckets<K> {
    map: HashMap<K, TokenBucket>,
    max: usize,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(max: usize) -> Self {
        Self {
            map: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Takes one token from `key`'s bucket (created full).
    pub fn take(&mut self, key: &K, rate: u32, burst: u32, now: Instant) -> Result<(), u32> {
        if rate == 0 {
            return Ok(());
        }
        if let Some(b) = self.map.get_mut(key) {
            return b.take(rate, burst, now);
        }
        if self.map.len() >= self.max {
            self.map.retain(|_, b| !b.refilled(rate, burst, now));
            if self.map.len() >= self.max {
                let mut ages: Vec<Instant> = self.map.values().map(|b| b.at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                self.map.retain(|_, b| b.at > cut);
            }
        }
        let mut b = TokenBucket::full(burst, now);
        let r = b.take(rate, burst, now);
        self.map.insert(key.clone(), b);
        r
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

    #[test]
    fn tables_stay_bounded_and_keep_limiting_the_busy_key() {
        let t0 = Instant::now();
        let mut m: Buckets<u32> = Buckets::new(100);
        for _ in 0..5 {
            assert!(m.take(&7, 1, 5, t0).is_ok());
        }
        assert!(m.take(&7, 1, 5, t0).is_err());
        for k in 1000..5000 {
            let _ = m.take(&k, 1, 5, t0 + Duration::from_millis(1));
        }
        assert!(m.len() <= 100, "{}", m.len());
    }
}
