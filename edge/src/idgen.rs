//! Server message ids: unique in a region, increasing per shard, fixed-length on the wire.
//!
//! An id is `(µs since 2024-01-01 UTC) << 14 | node << 6 | shard`: the shard's own clock
//! reading (50 bits: until 2059), kept strictly increasing (a burst runs ahead of the clock,
//! never backwards), then the edge's node id (8 bits, 0 in the one-box deployment) and the
//! shard number (6 bits), so no two shards of a region ever mint the same id. A recipient's
//! messages are stored and drained in id order, so one sender's messages (always minted by the
//! sender's shard) keep their send order. At startup the embedded generator is seeded with the
//! highest id the store has seen, so a restart with a clock that stepped back still never
//! reuses an id; in a cluster the node's clock must not step back across a restart by more than
//! the time the restart takes.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the id that carry the shard number.
pub const SHARD_BITS: u32 = 6;
/// Bits of the id that carry the node id.
pub const NODE_BITS: u32 = 8;
/// Shards an edge may run (ids carry the shard in [`SHARD_BITS`]).
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// The largest node id.
pub const MAX_NODE: u32 = (1 << NODE_BITS) - 1;
/// The id clock's epoch: 2024-01-01T00:00:00Z in Unix microseconds.
pub const EPOCH_MICROS: u64 = 1_704_067_200_000_000;
const LOW_BITS: u32 = SHARD_BITS + NODE_BITS;

/// One shard's id generator (not shared: each shard owns its own).
#[derive(Debug)]
pub struct IdGen {
    tag: u64,
    last_us: u64,
}

impl IdGen {
    /// `floor` is the highest id ever stored (from the store), or 0.
    pub fn new(node: u32, shard: usize, floor: u64) -> Self {
        let node = u64::from(node) & u64::from(MAX_NODE);
        let shard = shard as u64 & (MAX_SHARDS as u64 - 1);
        Self {
            tag: (node << SHARD_BITS) | shard,
            last_us: floor >> LOW_BITS,
        }
    }

    /// The next id of this shard.
    pub fn next_id(&mut self) -> u64 {
        let now = now_micros().saturating_sub(EPOCH_MICROS);
        self.last_us = if now > self.last_us {
            now
        } else {
            self.last_us + 1
        };
        (self.last_us << LOW_BITS) | self.tag
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
    fn the_bus_reads_the_accept_time_with_this_layout() {
        // Hop latencies (`iris_bus::hops`) are computed from ids by the same epoch and layout.
        assert_eq!(EPOCH_MICROS, iris_bus::hops::ID_EPOCH_MICROS);
        assert_eq!(LOW_BITS, iris_bus::hops::ID_LOW_BITS);
        let id = IdGen::new(3, 1, 0).next_id();
        assert!(iris_bus::hops::id_age_micros(id) < 5_000_000);
    }

    #[test]
    fn strictly_increasing_and_tagged() {
        let mut g = IdGen::new(5, 3, 0);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > last);
            assert_eq!(id & 63, 3);
            assert_eq!((id >> 6) & 255, 5);
            last = id;
        }
    }

    #[test]
    fn two_nodes_never_collide() {
        let mut a = IdGen::new(1, 0, 0);
        let mut b = IdGen::new(2, 0, 0);
        let ids: std::collections::HashSet<u64> =
            (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }

    #[test]
    fn floor_in_the_future_is_respected() {
        let floor = ((now_micros() - EPOCH_MICROS) + 10_000_000) << LOW_BITS;
        let mut g = IdGen::new(0, 0, floor);
        assert!(g.next_id() > floor);
    }

    #[test]
    fn clock_fits_until_2059() {
        // 2059-01-01 in Unix microseconds, minus the epoch, still fits in 64 - 14 bits.
        let y2059 = 2_808_691_200_000_000u64;
        assert!((y2059 - EPOCH_MICROS) < 1 << (64 - LOW_BITS));
    }
}
