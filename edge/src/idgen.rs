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
//! the clock. A shard raises it with each id it mints ahead of the clock (one atomic
//! `fetch_max`, only then); an id at the clock touches nothing shared. A connection reads it once,
//! at LOGIN, and its first message is minted above it ([`IdGen::next_id_above`]). So a sender
//! whose burst ran its shard's generator ahead, and who reconnects (after the edge accepted the
//! burst: there is no send acknowledgement in v1, so "sent before" means "read by the edge
//! before the new LOGIN") and lands on another shard, still gets higher ids there, and the
//! recipient's drain keeps its order (`tests/tests/sender_order.rs`). Ids minted at the clock
//! need nothing: a later id on another shard is at the clock too and higher as soon as one
//! 16 µs tick passed between them, far less than a reconnect and its LOGIN (`login_settle_us`
//! alone is 500 µs). The shards are not otherwise coupled: one that bursts does not drag the
//! others ahead of the clock. Ids minted on another edge are not covered: a sender that
//! reconnects to another edge within its burst's run-ahead (16 µs per id beyond one per tick)
//! may still see its later messages drained first.

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
/// process, shared by its shards and read by each LOGIN (see the module documentation).
#[derive(Debug, Default)]
pub struct HighWater(AtomicU64);

impl HighWater {
    /// The highest tick published so far (0 if none).
    pub fn tick(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One shard's id generator (each shard owns its own; they share only a [`HighWater`], which
/// it writes while it runs ahead of the clock).
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

    /// The edge's [`HighWater`] tick now: what a connection logging in reads, to mint its first
    /// message above it.
    pub fn high_water(&self) -> u64 {
        self.high.tick()
    }

    /// The next id of this shard: above its previous id and the clock.
    pub fn next_id(&mut self) -> u64 {
        self.next_id_above(0)
    }

    /// The next id of this shard, also above `floor_tick`: a [`HighWater::tick`] read when
    /// the connection minting it logged in (0: none).
    pub fn next_id_above(&mut self, floor_tick: u64) -> u64 {
        let now = now_micros().saturating_sub(EPOCH_MICROS) / TICK_MICROS;
        self.next_id_at(now, floor_tick)
    }

    /// [`IdGen::next_id_above`] with the clock reading `now` given, in ticks since the id
    /// epoch (for tests and benchmarks).
    pub fn next_id_at(&mut self, now: u64, floor_tick: u64) -> u64 {
        let tick = if now > self.last_tick {
            now
        } else {
            self.last_tick + 1
        }
        .max(floor_tick.saturating_add(1));
        if tick > now {
            // Ahead of the clock: every LOGIN from now on mints above it, on any shard.
            self.high.0.fetch_max(tick, Ordering::Release);
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
        let mut g = IdGen::new(7, 3, 1, 0, hw());
        let before = now_micros();
        let id = g.next_id();
        let after = now_micros();
        // The id carries the clock reading taken between the two, rounded down to its tick.
        let accepted = iris_bus::hops::id_accept_micros(id);
        assert!(
            before / TICK_MICROS * TICK_MICROS <= accepted && accepted <= after,
            "{before} <= {accepted} <= {after}"
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
    fn a_login_after_a_burst_on_another_shard_mints_above_it() {
        // Regression (sender_order.rs): shard 1 mints 1000 ids in one tick, running 999 ticks
        // ahead of the clock; a connection that logs in on shard 0 afterwards used to get an id
        // at the clock, below all of them.
        let high = hw();
        let mut a = IdGen::new(0, 0, 1, 0, high.clone());
        let mut b = IdGen::new(0, 0, 0, 0, high.clone());
        let now = 1_000_000;
        let burst: Vec<u64> = (0..1000).map(|_| a.next_id_at(now, 0)).collect();
        assert!(burst.windows(2).all(|w| w[0] < w[1]));
        let last = *burst.last().unwrap();
        assert_eq!(high.tick(), last >> LOW_BITS);
        // Without the floor (an old connection of shard 0): at the clock, below the burst.
        assert!(b.next_id_at(now + 5, 0) < last);
        // The connection that logged in after the burst: above it, and so is everything
        // shard 0 mints after it.
        let floor = high.tick();
        let first = b.next_id_at(now + 6, floor);
        assert!(first > last, "{first:#x} <= {last:#x}");
        assert!(b.next_id_at(now + 7, 0) > first);
        // Shard 1 is not dragged along: at the clock once the clock passes its own run-ahead.
        let later = now + 10_000;
        assert_eq!(a.next_id_at(later, 0) >> LOW_BITS, later);
    }

    #[test]
    fn at_the_clock_nothing_is_published() {
        let high = hw();
        let mut g = IdGen::new(0, 0, 0, 0, high.clone());
        assert_eq!(g.next_id_at(100, 0) >> LOW_BITS, 100);
        assert_eq!(g.next_id_at(101, 0) >> LOW_BITS, 101);
        assert_eq!(high.tick(), 0, "an id at the clock needs no shared write");
        // The second id of a tick is ahead of the clock: published.
        assert_eq!(g.next_id_at(101, 0) >> LOW_BITS, 102);
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
