//! Exact loss, duplicate and reorder accounting for one stream of sequence numbers.
//!
//! A [`SeqTracker`] remembers which sequence numbers arrived: every number below `base` did, and
//! a bitmap covers the window above it. The window slides forward as soon as its first 64
//! numbers are all in, so with no loss it stays one word long. A gap (a lost message) holds the
//! window back; after [`MAX_WINDOW`] numbers beyond a gap the tracker gives the gap up (counted
//! in [`SeqTracker::given_up`]) and a late arrival of those numbers would then be counted as a
//! duplicate. Within the window (a million messages per stream) every count is exact.
//!
//! Definitions: a **duplicate** is an arrival of a number that already arrived; an arrival is
//! **reordered** when it is new but a higher number arrived before it; **lost** = sent − distinct
//! arrivals, known once the run is over.

use std::collections::VecDeque;

/// Sequence numbers a tracker remembers beyond its lowest missing one.
pub const MAX_WINDOW: u64 = 1 << 20;
const WORDS: usize = (MAX_WINDOW / 64) as usize;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival, in order.
    InOrder,
    /// First arrival, after a higher number.
    Reordered,
    /// Arrived before.
    Duplicate,
}

/// Tracks one stream; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    base: u64,
    words: VecDeque<u64>,
    highest: Option<u64>,
    /// Distinct sequence numbers that arrived.
    pub distinct: u64,
    /// Arrivals of a number that had already arrived.
    pub duplicates: u64,
    /// First arrivals after a higher number.
    pub reordered: u64,
    /// Numbers never seen that slid out of the window.
    pub given_up: u64,
}

impl SeqTracker {
    /// A tracker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the arrival of `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq < self.base {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        let mut word = (seq - self.base) / 64;
        while word >= WORDS as u64 {
            let front = self.words.pop_front().unwrap_or(0);
            self.given_up += u64::from(64 - front.count_ones());
            self.base += 64;
            word -= 1;
        }
        let word = word as usize;
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << ((seq - self.base) % 64);
        if self.words[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.words[word] |= bit;
        self.distinct += 1;
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        match self.highest {
            Some(h) if seq < h => {
                self.reordered += 1;
                Arrival::Reordered
            }
            _ => {
                self.highest = Some(seq);
                Arrival::InOrder
            }
        }
    }

    /// Highest sequence number seen, if any.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Messages lost if `sent` were sent: `sent − distinct`, never negative.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.distinct)
    }

    /// Whether `seq` has arrived.
    pub fn has(&self, seq: u64) -> bool {
        if seq < self.base {
            return true;
        }
        let off = seq - self.base;
        let word = (off / 64) as usize;
        self.words
            .get(word)
            .is_some_and(|w| w & (1u64 << (off % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_stays_small() {
        let mut t = SeqTracker::new();
        for s in 0..10_000 {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert!(t.words.len() <= 1);
        assert_eq!((t.distinct, t.duplicates, t.reordered), (10_000, 0, 0));
        assert_eq!(t.lost(10_000), 0);
    }

    #[test]
    fn loss_duplicate_reorder() {
        let mut t = SeqTracker::new();
        for s in [0, 1, 3, 2, 2, 5, 0, 6] {
            t.record(s);
        }
        // 4 is lost; 2 arrived after 3 (reordered); 2 and 0 again (duplicates).
        assert_eq!(t.distinct, 6);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.lost(7), 1);
        assert!(t.has(3) && !t.has(4) && t.has(6) && !t.has(7));
    }

    #[test]
    fn window_gives_up_old_gaps() {
        let mut t = SeqTracker::new();
        t.record(1);
        t.record(MAX_WINDOW + 200);
        assert!(t.given_up >= 1);
        assert_eq!(t.record(0), Arrival::Duplicate);
    }

    proptest! {
        #[test]
        fn matches_a_set(seqs in proptest::collection::vec(0u64..300, 0..600)) {
            let mut t = SeqTracker::new();
            let mut seen = std::collections::BTreeSet::new();
            let mut highest: Option<u64> = None;
            let (mut dups, mut reord) = (0, 0);
            for &s in &seqs {
                let want = if !seen.insert(s) {
                    dups += 1;
                    Arrival::Duplicate
                } else if highest.is_some_and(|h| s < h) {
                    reord += 1;
                    Arrival::Reordered
                } else {
                    highest = Some(s);
                    Arrival::InOrder
                };
                prop_assert_eq!(t.record(s), want);
            }
            prop_assert_eq!(t.distinct, seen.len() as u64);
            prop_assert_eq!(t.duplicates, dups);
            prop_assert_eq!(t.reordered, reord);
            for s in 0..310 {
                prop_assert_eq!(t.has(s), seen.contains(&s));
            }
        }
    }
}
