//! Per-hop latency of a message through the cluster, measured from the moment its edge accepted
//! it.
//!
//! A message id carries the accepting shard's clock (`(µs since 2024-01-01 UTC / 16) << 18 |
//! region << 14 | node << 6 | shard`, see `iris_edge::idgen`), so every process a message passes can tell how long ago it
//! was accepted without any field added to the frames: [`id_age_micros`]. Each process keeps one
//! [`HopHistogram`] per hop it sees (the edge: produce acknowledged, inbox arrival, socket write;
//! the core: consumed, routed) and renders them as Prometheus histograms
//! (`..._seconds_bucket{hop="...",le="..."}`), so an operator sees where the time goes.
//!
//! Clocks: within one host the figures are exact; across hosts they include the clock offset
//! between the accepting edge and the measuring process (NTP keeps it to about a millisecond).
//! An id from the future (a clock behind the sender's) counts as 0.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The id clock's epoch (2024-01-01T00:00:00Z) in Unix microseconds, as the edge mints ids.
pub const ID_EPOCH_MICROS: u64 = 1_704_067_200_000_000;
/// Bits below the id's clock reading (region index, node and shard).
pub const ID_LOW_BITS: u32 = 18;
/// Microseconds per tick of the id's clock reading.
pub const ID_TICK_MICROS: u64 = 16;
/// Position of the 4-bit region index (the accepting region's place in the region list).
pub const ID_REGION_SHIFT: u32 = 14;
/// Bits of the region index.
pub const ID_REGION_BITS: u32 = 4;

/// The index (in the region list) of the region whose edge minted `id`.
pub fn id_region(id: u64) -> u32 {
    ((id >> ID_REGION_SHIFT) & ((1 << ID_REGION_BITS) - 1)) as u32
}

/// When (Unix µs) the message with id `id` was accepted, to the id clock's 16 µs tick.
pub fn id_accept_micros(id: u64) -> u64 {
    (id >> ID_LOW_BITS)
        .saturating_mul(ID_TICK_MICROS)
        .saturating_add(ID_EPOCH_MICROS)
}

/// Upper bounds of the buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_MICROS: [u64; 16] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 100_000,
    250_000, 1_000_000, 5_000_000,
];

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How long ago (µs) the message with id `id` was accepted, by this process's clock.
pub fn id_age_micros(id: u64) -> u64 {
    unix_micros().saturating_sub(id_accept_micros(id))
}

/// A fixed-bucket latency histogram, written with relaxed atomics from any thread.
#[derive(Debug, Default)]
pub struct HopHistogram {
    buckets: [AtomicU64; BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl HopHistogram {
    /// Records one latency in microseconds.
    pub fn record_micros(&self, micros: u64) {
        let i = BUCKETS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(BUCKETS_MICROS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the age of message `id` now ([`id_age_micros`]).
    pub fn record_id(&self, id: u64) {
        self.record_micros(id_age_micros(id));
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// A copy of the counts: per bucket (not cumulative), the sum in µs and the count.
    pub fn snapshot(&self) -> HopSnapshot {
        HopSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of a [`HopHistogram`]; snapshots of several shards add up with
/// [`HopSnapshot::add`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HopSnapshot {
    pub buckets: [u64; BUCKETS_MICROS.len() + 1],
    pub sum_micros: u64,
    pub count: u64,
}

impl HopSnapshot {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &HopSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_micros += other.sum_micros;
        self.count += other.count;
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1); `None` when empty or in
    /// the +Inf bucket.
    pub fn quantile_bound_micros(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return BUCKETS_MICROS.get(i).copied();
            }
        }
        None
    }

    /// Appends this histogram in Prometheus text format as the series `name` with the label
    /// `hop="{hop}"` (`name` should end in `_seconds`; the `# HELP`/`# TYPE` lines are the
    /// caller's, once per name).
    pub fn render(&self, out: &mut String, name: &str, hop: &str) {
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            match BUCKETS_MICROS.get(i) {
                Some(&b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{hop=\"{hop}\",le=\"{}\"}} {cumulative}",
                        b as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{hop=\"{hop}\",le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "{name}_sum{{hop=\"{hop}\"}} {}",
            self.sum_micros as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{hop=\"{hop}\"}} {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounded_quantiles_follow() {
        let h = HopHistogram::default();
        for us in [100, 900, 1_500, 4_000, 19_000, 9_000_000] {
            h.record_micros(us);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.sum_micros, 100 + 900 + 1_500 + 4_000 + 19_000 + 9_000_000);
        assert_eq!(s.quantile_bound_micros(0.5), Some(2_000));
        assert_eq!(s.quantile_bound_micros(0.8), Some(20_000));
        assert_eq!(s.quantile_bound_micros(1.0), None);
        let mut out = String::new();
        s.render(&mut out, "iris_test_seconds", "x");
        assert!(out.contains("iris_test_seconds_bucket{hop=\"x\",le=\"0.00025\"} 1\n"));
        assert!(out.contains("iris_test_seconds_bucket{hop=\"x\",le=\"0.002\"} 3\n"));
        assert!(out.contains("iris_test_seconds_bucket{hop=\"x\",le=\"+Inf\"} 6\n"));
        assert!(out.contains("iris_test_seconds_count{hop=\"x\"} 6\n"));
        let mut twice = s;
        twice.add(&s);
        assert_eq!(twice.count, 12);
    }

    #[test]
    fn the_age_of_an_id_comes_from_its_clock_bits() {
        let now = unix_micros() - ID_EPOCH_MICROS;
        let id = (((now - 3_000) / ID_TICK_MICROS) << ID_LOW_BITS) | (15 << 14) | (255 << 6) | 63;
        let age = id_age_micros(id);
        assert!((3_000..1_000_000).contains(&age), "{age}");
        // From the future: 0, not a wrap-around.
        let future = (((now + 10_000_000) / ID_TICK_MICROS) << ID_LOW_BITS) | 1;
        assert_eq!(id_age_micros(future), 0);
    }

    #[test]
    fn the_region_index_sits_above_node_and_shard() {
        let tick = 123_456_789u64;
        for region in 0..16u64 {
            let id = (tick << ID_LOW_BITS) | (region << ID_REGION_SHIFT) | (255 << 6) | 63;
            assert_eq!(id_region(id), region as u32);
            assert_eq!(id_accept_micros(id), tick * 16 + ID_EPOCH_MICROS);
        }
        assert_eq!(ID_REGION_SHIFT + ID_REGION_BITS, ID_LOW_BITS);
    }
}
