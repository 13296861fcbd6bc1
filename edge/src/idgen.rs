//! Server message ids: unique, increasing per shard, fixed-length on the wire.
//!
//! An id is `(microseconds << 10) | shard`: the shard's own clock reading, kept strictly
//! increasing (a burst runs ahead of the clock, never backwards), with the shard number in the
//! low 10 bits so two shards never mint the same id. A recipient's messages are stored and
//! drained in id order, so one sender's messages (always minted by the sender's shard) keep
//! their send order. At startup the generator is seeded with the highest id the store has seen,
//! so a restart with a clock that stepped back still never reuses an id.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the id that carry the shard number.
pub const SHARD_BITS: u32 = 10;

/// One shard's id generator (not shared: each shard owns its own).
#[derive(Debug)]
pub struct IdGen {
    shard: u64,
    last_us: u64,
}

impl IdGen {
    /// `floor` is the highest id ever stored (from the store), or 0.
    pub fn new(shard: usize, floor: u64) -> Self {
        Self {
            shard: shard as u64 & ((1 << SHARD_BITS) - 1),
            last_us: floor >> SHARD_BITS,
        }
    }

    /// The next id of this shard.
    pub fn next_id(&mut self) -> u64 {
        let now = now_micros();
        self.last_us = if now > self.last_us {
            now
        } else {
            self.last_us + 1
        };
        (self.last_us << SHARD_BITS) | self.shard
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_and_shard_tagged() {
        let mut g = IdGen::new(3, 0);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > last);
            assert_eq!(id & 1023, 3);
            last = id;
        }
    }

    #[test]
    fn floor_in_the_future_is_respected() {
        let floor = (now_micros() + 10_000_000) << SHARD_BITS;
        let mut g = IdGen::new(0, floor);
        assert!(g.next_id() > floor);
    }
}
