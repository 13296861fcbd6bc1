//! Server message ids: unique across regions, increasing per shard, fixed-length on the wire.
//!
//! An id is `(µs since 2024-01-01 UTC / 16) << 18 | region << 14 | node << 6 | shard`: the
//! shard's own clock reading in 16 µs ticks (46 bits: until 2059), kept strictly increasing (a
//! burst of more than one id per tick runs ahead of the clock, never backwards), then the
//! region's index in the region list (4 bits, 0 for a single region), the edge's node id (8
//! bits, 0 in the one-box deployment) and the shard number (6 bits), so no two shards of a
//! deployment ever mint the same id. The magnitude is continuous with the previous layout
//! (`µs << 14`): `(µs / 16) << 18` is the same number to within one tick, so ids minted after an
//! upgrade sort after those minted before it and a store's id floor keeps working. A recipient's
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
/// Bits of the id that carry the region index.
pub const REGION_BITS: u32 = 4;
/// The largest region index.
pub const MAX_REGION_INDEX: u32 = (1 << REGION_BITS) - 1;
/// Microseconds per tick of the id clock.
pub const TICK_MICROS: u64 = 16;
/// Shards an edge may run (ids carry the shard in [`SHARD_BITS`]).
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// The largest node id.
pub const MAX_NODE: u32 = (1 << NODE_BITS) - 1;
/// The id clock's epoch: 2024-01-01T00:00:00Z in Unix microseconds.
pub const EPOCH_MICROS: u64 = 1_704_067_200_000_000;
const LOW_BITS: u32 = SHARD_BITS + NODE_BITS + REGION_BITS;
const REGION_SHIFT: u32 = SHARD_BITS + NODE_BITS;

/// One shard's id generator (not shared: each shard owns its own).
#[derive(Debug)]
pub struct IdGen {
    tag: u64,
    last_tick: u64,
}

impl IdGen {
    /// `region_index` is the region's position in the region list (0 for a single region);
    /// `floor` is the highest id ever stored (from the store), or 0.
    pub fn new(region_index: u32, node: u32, shard: usize, floor: u64) -> Self {
        let region = u64::from(region_index) & u64::from(MAX_REGION_INDEX);
        let node = u64::from(node) & u64::from(MAX_NODE);
        let shard = shard as u64 & (MAX_SHARDS as u64 - 1);
        Self {
            tag: (region << REGION_SHIFT) | (node << SHARD_BITS) | shard,
            last_tick: floor >> LOW_BITS,
        }
    }

    /// The next id of this shard.
    pub fn next_id(&mut self) -> u64 {
        let now = now_micros().saturating_sub(EPOCH_MICROS) / TICK_MICROS;
        self.last_tick = if now > self.last_tick {
            now
        } else {
            self.last_tick + 1
        };
        (self.last_tick << LOW_BITS) | self.tag
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
        assert_eq!(REGION_SHIFT, iris_bus::hops::ID_REGION_SHIFT);
        assert_eq!(TICK_MICROS, iris_bus::hops::ID_TICK_MICROS);
        let before = now_micros();
        let id = IdGen::new(7, 3, 1, 0).next_id();
        let accepted = iris_bus::hops::id_accept_micros(id);
        assert!(
            accepted <= before && before - accepted < 5_000_000,
            "{accepted} {before}"
        );
        assert!(iris_bus::hops::id_age_micros(id) < 5_000_000);
        assert_eq!(iris_bus::hops::id_region(id), 7);
    }

    #[test]
    fn strictly_increasing_and_tagged() {
        let mut g = IdGen::new(9, 5, 3, 0);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > last);
            assert_eq!(id & 63, 3);
            assert_eq!((id >> 6) & 255, 5);
            assert_eq!((id >> 14) & 15, 9);
            last = id;
        }
    }

    #[test]
    fn two_nodes_never_collide() {
        let mut a = IdGen::new(0, 1, 0, 0);
        let mut b = IdGen::new(0, 2, 0, 0);
        let ids: std::collections::HashSet<u64> =
            (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }

    #[test]
    fn two_regions_with_the_same_node_and_shard_never_collide() {
        // Same node and shard in two regions, minting in the same ticks.
        let mut gens: Vec<IdGen> = (0..=MAX_REGION_INDEX)
            .map(|r| IdGen::new(r, 1, 0, 0))
            .collect();
        let mut ids = std::collections::HashSet::new();
        for _ in 0..2_000 {
            for (r, g) in gens.iter_mut().enumerate() {
                let id = g.next_id();
                assert_eq!(iris_bus::hops::id_region(id), r as u32);
                assert!(ids.insert(id), "region {r} minted {id:#x} twice");
            }
        }
        assert_eq!(ids.len(), 2_000 * 16);
        // Out-of-range indexes are masked, never spilling into the clock bits.
        let id = IdGen::new(16 + 2, 1, 0, 0).next_id();
        assert_eq!(iris_bus::hops::id_region(id), 2);
    }

    #[test]
    fn new_ids_sort_after_old_layout_ids_minted_a_second_earlier() {
        // The previous layout: (µs since the epoch) << 14 | node << 6 | shard.
        let old_layout = |us: u64, node: u64, shard: u64| (us << 14) | (node << 6) | shard;
        let second_ago = now_micros() - EPOCH_MICROS - 1_000_000;
        let old = old_layout(second_ago, MAX_NODE as u64, 63);
        let mut g = IdGen::new(0, 0, 0, 0);
        let new = g.next_id();
        assert!(new > old, "{new:#x} <= {old:#x}");
        // ... and a store's floor written by the old layout still moves the clock forward.
        let future_old = old_layout(second_ago + 10_000_000, 3, 1);
        let mut g = IdGen::new(2, 3, 1, future_old);
        assert!(g.next_id() > future_old);
        // Within one tick of the same magnitude: the clocks agree.
        let now = now_micros() - EPOCH_MICROS;
        let new = IdGen::new(0, 0, 0, 0).next_id();
        let old = old_layout(now, 0, 0);
        let diff = new.abs_diff(old);
        assert!(diff < 1_000_000 << 14, "{diff}");
    }

    #[test]
    fn floor_in_the_future_is_respected() {
        let floor = (((now_micros() - EPOCH_MICROS) + 10_000_000) / TICK_MICROS) << LOW_BITS;
        let mut g = IdGen::new(0, 0, 0, floor);
        assert!(g.next_id() > floor);
    }

    #[test]
    fn clock_fits_until_2059() {
        // 2059-01-01 in Unix microseconds, minus the epoch, in ticks, still fits in 64 - 18 bits.
        let y2059 = 2_808_691_200_000_000u64;
        assert!((y2059 - EPOCH_MICROS) / TICK_MICROS < 1 << (64 - LOW_BITS));
    }
}
