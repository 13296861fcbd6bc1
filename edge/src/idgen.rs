//! Server message ids: unique across regions, increasing per shard, fixed-length on the wire.
//!
//! An id is `(µs since 2024-01-01 UTC / 16) << 18 | region << 14 | node << 6 | shard`: the
//! shard's own clock reading in 16 µs ticks (46 bits: until 2059), kept strictly increasing (a
//! burst of more than one id per tick runs ahead of the clock, never backwards), then the
//! region's index in the region list (4 bits, 0 for a single region), the edge's node id (8
//! bits, 0 in the one-box deployment) and the shard number (6 bits), so no two shards of a
//! deployment ever mint the same id.
//!
//! # One sender across shards
//! The shards of one edge share a [`HighWater`]: the highest tick any of them minted ahead of
//! the clock. A shard that runs ahead raises it (one atomic `fetch_max`, only while ahead), and
//! every shard mints above it (one atomic load per id). So an id minted after another id was
//! minted on any shard of the edge is higher: a sender whose burst ran its shard's generator
//! ahead and who reconnects onto another shard keeps its order in the recipient's drain
//! (`tests/tests/sender_order.rs`). An id minted at the clock is not published (that would
//! write the shared line on every id); a later id on another shard is at the clock too and
//! higher as soon as one 16 µs tick passed between them, far less than a reconnect and its
//! LOGIN (`login_settle_us` alone is 500 µs). While a shard runs ahead, the others follow it:
//! the edge then runs ahead at the rate of all its shards together. Ids minted on another edge
//! are not covered: a sender that reconnects to another edge within its burst's run-ahead (16 µs
//! per id beyond one per tick) may still see its later messages drained first. The magnitude is continuous with the previous layout
//! (`µs << 14`): `(µs / 16) << 18` is the same number to within one tick, so ids minted after an
//! upgrade sort after those minted before it and a store's id floor keeps working. A recipient's
//! messages are stored and drained in id order, so one sender's messages (always minted by the
//! sender's shard) keep their send order. At startup the embedded generator is seeded with the
//! highest id the store has seen, so a restart with a clock that stepped back still never
//! reuses an id; in a cluster the node's clock must not step back across a restart by more than
//! the time the restart takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The highest tick minted ahead of the clock by any generator sharing it: one per edge
/// process, shared by its shards (see the module documentation).
#[derive(Debug, Default)]
pub struct HighWater(AtomicU64);

impl HighWater {
    /// The highest tick published so far (0 if none).
    pub fn tick(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One shard's id generator (each shard owns its own; they share only a [`HighWater`]).
#[derive(Debug)]
pub struct IdGen {
    tag: u64,
    last_tick: u64,
    high: Arc<HighWater>,
}

impl IdGen {
    /// `region_index` is the region's position in the region list (0 for a single region);
    /// `floor` is the highest id ever stored (from the store), or 0; `high` is shared by every
    /// shard of the edge.
    pub fn new(
        region_index: u32,
        node: u32,
        shard: usize,
        floor: u64,
        high: Arc<HighWater>,
    ) -> Self {
        let region = u64::from(region_index) & u64::from(MAX_REGION_INDEX);
        let node = u64::from(node) & u64::from(MAX_NODE);
        let shard = shard as u64 & (MAX_SHARDS as u64 - 1);
        Self {
            tag: (region << REGION_SHIFT) | (node << SHARD_BITS) | shard,
            last_tick: floor >> LOW_BITS,
            high,
        }
    }

    /// The next id of this shard: above its previous id, the clock, and every tick another
    /// shard minted ahead of the clock.
    pub fn next_id(&mut self) -> u64 {
        let now = now_micros().saturating_sub(EPOCH_MICROS) / TICK_MICROS;
        self.next_id_at(now)
    }

    /// [`IdGen::next_id`] with the clock reading `now` given, in ticks since the id epoch
    /// (for tests and benchmarks).
    pub fn next_id_at(&mut self, now: u64) -> u64 {
        let mut tick = if now > self.last_tick {
            now
        } else {
            self.last_tick + 1
        };
        // Equal to a published tick means another shard minted it: go past it (ids of the same
        // tick sort by shard number, not by time).
        let high = self.high.tick();
        if high >= tick {
            tick = high + 1;
        }
        if tick > now {
            // Ahead of the clock: what this shard mints next, every shard mints above.
            self.high.0.fetch_max(tick, Ordering::AcqRel);
        }
        self.last_tick = tick;
        (tick << LOW_BITS) | self.tag
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

    fn hw() -> Arc<HighWater> {
        Arc::new(HighWater::default())
    }

    #[test]
    fn the_bus_reads_the_accept_time_with_this_layout() {
        // Hop latencies (`iris_bus::hops`) are computed from ids by the same epoch and layout.
        assert_eq!(EPOCH_MICROS, iris_bus::hops::ID_EPOCH_MICROS);
        assert_eq!(LOW_BITS, iris_bus::hops::ID_LOW_BITS);
        assert_eq!(REGION_SHIFT, iris_bus::hops::ID_REGION_SHIFT);
        assert_eq!(TICK_MICROS, iris_bus::hops::ID_TICK_MICROS);
        let before = now_micros();
        let id = IdGen::new(7, 3, 1, 0, hw()).next_id();
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
        let mut g = IdGen::new(9, 5, 3, 0, hw());
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
        let mut a = IdGen::new(0, 1, 0, 0, hw());
        let mut b = IdGen::new(0, 2, 0, 0, hw());
        let ids: std::collections::HashSet<u64> =
            (0..1000).flat_map(|_| [a.next_id(), b.next_id()]).collect();
        assert_eq!(ids.len(), 2000);
    }

    #[test]
    fn two_regions_with_the_same_node_and_shard_never_collide() {
        // Same node and shard in two regions, minting in the same ticks.
        let mut gens: Vec<IdGen> = (0..=MAX_REGION_INDEX)
            .map(|r| IdGen::new(r, 1, 0, 0, hw()))
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
        let id = IdGen::new(16 + 2, 1, 0, 0, hw()).next_id();
        assert_eq!(iris_bus::hops::id_region(id), 2);
    }

    #[test]
    fn new_ids_sort_after_old_layout_ids_minted_a_second_earlier() {
        // The previous layout: (µs since the epoch) << 14 | node << 6 | shard.
        let old_layout = |us: u64, node: u64, shard: u64| (us << 14) | (node << 6) | shard;
        let second_ago = now_micros() - EPOCH_MICROS - 1_000_000;
        let old = old_layout(second_ago, MAX_NODE as u64, 63);
        let mut g = IdGen::new(0, 0, 0, 0, hw());
        let new = g.next_id();
        assert!(new > old, "{new:#x} <= {old:#x}");
        // ... and a store's floor written by the old layout still moves the clock forward.
        let future_old = old_layout(second_ago + 10_000_000, 3, 1);
        let mut g = IdGen::new(2, 3, 1, future_old, hw());
        assert!(g.next_id() > future_old);
        // Within one tick of the same magnitude: the clocks agree.
        let now = now_micros() - EPOCH_MICROS;
        let new = IdGen::new(0, 0, 0, 0, hw()).next_id();
        let old = old_layout(now, 0, 0);
        let diff = new.abs_diff(old);
        assert!(diff < 1_000_000 << 14, "{diff}");
    }

    #[test]
    fn floor_in_the_future_is_respected() {
        let floor = (((now_micros() - EPOCH_MICROS) + 10_000_000) / TICK_MICROS) << LOW_BITS;
        let mut g = IdGen::new(0, 0, 0, floor, hw());
        assert!(g.next_id() > floor);
    }

    #[test]
    fn clock_fits_until_2059() {
        // 2059-01-01 in Unix microseconds, minus the epoch, in ticks, still fits in 64 - 18 bits.
        let y2059 = 2_808_691_200_000_000u64;
        assert!((y2059 - EPOCH_MICROS) / TICK_MICROS < 1 << (64 - LOW_BITS));
    }

    #[test]
    fn a_shard_mints_above_what_another_shard_minted_ahead_of_the_clock() {
        // Regression (sender_order.rs): shard 1 bursts 1000 ids in one tick, running 999
        // ticks ahead of the clock; shard 0, at the clock, used to mint below all of them.
        let high = hw();
        let mut a = IdGen::new(0, 0, 1, 0, high.clone());
        let mut b = IdGen::new(0, 0, 0, 0, high.clone());
        let now = 1_000_000;
        let burst: Vec<u64> = (0..1000).map(|_| a.next_id_at(now)).collect();
        assert!(burst.windows(2).all(|w| w[0] < w[1]));
        let last = *burst.last().unwrap();
        assert_eq!(high.tick(), last >> LOW_BITS);
        // Shard 0 a few ticks later (its clock far behind shard 1's run-ahead): above.
        let next = b.next_id_at(now + 5);
        assert!(next > last, "{next:#x} <= {last:#x}");
        // And shard 1 stays above shard 0's id in turn.
        assert!(a.next_id_at(now + 5) > next);
        // Once the clock passes the run-ahead, both are at the clock again.
        let later = now + 10_000;
        assert_eq!(b.next_id_at(later) >> LOW_BITS, later);
        assert_eq!(a.next_id_at(later + 1) >> LOW_BITS, later + 1);
    }

    #[test]
    fn at_the_clock_nothing_is_published() {
        let high = hw();
        let mut g = IdGen::new(0, 0, 0, 0, high.clone());
        assert_eq!(g.next_id_at(100) >> LOW_BITS, 100);
        assert_eq!(g.next_id_at(101) >> LOW_BITS, 101);
        assert_eq!(high.tick(), 0, "an id at the clock needs no shared write");
        // The second id of a tick is ahead of the clock: published.
        assert_eq!(g.next_id_at(101) >> LOW_BITS, 102);
        assert_eq!(high.tick(), 102);
    }

    #[test]
    fn shards_minting_concurrently_never_collide_and_each_increases() {
        let high = hw();
        let threads: Vec<_> = (0..4)
            .map(|shard| {
                let high = high.clone();
                std::thread::spawn(move || {
                    let mut g = IdGen::new(0, 0, shard, 0, high);
                    let ids: Vec<u64> = (0..20_000).map(|_| g.next_id()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                    ids
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(all.insert(id));
            }
        }
    }
}
