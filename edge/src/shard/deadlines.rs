//! The shard-wide deadlines every connection has, of one fixed length each: the LOGIN settle
//! wait (`login_settle_us` after a LOGIN's first byte) and the login timeout (`login_timeout_ms`
//! after the accept). One FIFO queue per kind and one task per shard ([`Shard::deadline_keeper`]
//! in `mod.rs`) replace a glommio timer per connection and kind: a login used to insert two
//! timers into the reactor's timer map and remove them again, each boxed.
//!
//! Every entry of a queue waits the same time, so a queue is ordered by deadline as it is
//! pushed, and only a push into an empty queue can bring the earliest deadline forward (the
//! keeper is told then). The keeper sleeps until the earliest deadline plus [`GATHER`], so the
//! entries that come due within that time are handled in one wake-up, then marks each of their
//! connections ([`Due`]) and wakes it. Nothing is removed early: an entry whose connection has
//! closed is skipped when it comes due, and a login timeout that finds the user logged in does
//! nothing (as before). A queue thus holds an entry per connection accepted (or LOGIN seen) in
//! the last wait: 24 bytes each, at most 240,000 entries for 40,000 logins/s and the default
//! 10 s login timeout; its memory is given back when it empties.
//!
//! [`Shard::deadline_keeper`]: super::Shard

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use iris_core::api::ConnId;

/// How long after the earliest deadline the keeper wakes: the deadlines that fall within it are
/// served together, each at most this late.
pub const GATHER: Duration = Duration::from_micros(100);

/// A queue's memory is given back when it empties with more room than this many entries.
const KEEP_ENTRIES: usize = 1024;

/// What came due for a connection (bits of [`ConnShared`](super::conn::ConnShared)'s due mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The LOGIN settle wait ended: decode the LOGIN now.
    Settle = 0,
    /// The login timeout passed: close the connection unless it logged in.
    Login = 1,
}

impl Due {
    pub const ALL: [Due; 2] = [Due::Settle, Due::Login];

    pub fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The queues of one shard, one per [`Due`].
#[derive(Debug)]
pub struct Deadlines {
    queues: [RefCell<VecDeque<(Instant, ConnId)>>; 2],
    waits: [Duration; 2],
}

impl Deadlines {
    /// `settle` and `login`: the wait of each kind.
    pub fn new(settle: Duration, login: Duration) -> Self {
        Self {
            queues: Default::default(),
            waits: [settle, login],
        }
    }

    /// Queues `kind`'s deadline for connection `conn`, counted from `now`. True when the queue
    /// was empty: the keeper must be told (its earliest deadline may be later, or none).
    pub fn push(&self, kind: Due, conn: ConnId, now: Instant) -> bool {
        let mut q = self.queues[kind as usize].borrow_mut();
        q.push_back((now + self.waits[kind as usize], conn));
        q.len() == 1
    }

    /// The earliest deadline queued, if any.
    pub fn earliest(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.borrow().front().map(|&(at, _)| at))
            .min()
    }

    /// Takes every entry due at `now` into `out`, in queue order, kind by kind.
    pub fn take_due(&self, now: Instant, out: &mut Vec<(Due, ConnId)>) {
        for kind in Due::ALL {
            let mut q = self.queues[kind as usize].borrow_mut();
            while let Some(&(at, conn)) = q.front() {
                if at > now {
                    break;
                }
                q.pop_front();
                out.push((kind, conn));
            }
            if q.is_empty() && q.capacity() > KEEP_ENTRIES {
                *q = VecDeque::new();
            }
        }
    }

    /// Entries queued of `kind` (for tests).
    #[cfg(test)]
    fn len(&self, kind: Due) -> usize {
        self.queues[kind as usize].borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_in_order_kind_by_kind() {
        let d = Deadlines::new(Duration::from_micros(500), Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(d.earliest(), None);
        assert!(d.push(Due::Login, 1, t0), "first entry: tell the keeper");
        assert_eq!(d.earliest(), Some(t0 + Duration::from_secs(10)));
        // A settle pushed later is due long before the login timeout pushed first.
        assert!(d.push(Due::Settle, 2, t0 + Duration::from_millis(1)));
        assert!(!d.push(Due::Settle, 3, t0 + Duration::from_millis(2)));
        assert_eq!(
            d.earliest(),
            Some(t0 + Duration::from_millis(1) + Duration::from_micros(500))
        );
        let mut out = Vec::new();
        d.take_due(t0 + Duration::from_micros(1499), &mut out);
        assert!(
            out.is_empty(),
            "nothing is due before its deadline: {out:?}"
        );
        d.take_due(t0 + Duration::from_micros(1500), &mut out);
        assert_eq!(out, [(Due::Settle, 2)]);
        out.clear();
        d.take_due(t0 + Duration::from_secs(11), &mut out);
        assert_eq!(out, [(Due::Settle, 3), (Due::Login, 1)]);
        assert_eq!(d.earliest(), None);
        assert_eq!((d.len(Due::Settle), d.len(Due::Login)), (0, 0));
    }

    #[test]
    fn an_emptied_queue_gives_its_memory_back() {
        let d = Deadlines::new(Duration::ZERO, Duration::ZERO);
        let t0 = Instant::now();
        for c in 0..10_000 {
            d.push(Due::Login, c, t0);
        }
        let mut out = Vec::new();
        d.take_due(t0, &mut out);
        assert_eq!(out.len(), 10_000);
        assert_eq!(d.queues[Due::Login as usize].borrow().capacity(), 0);
    }

    #[test]
    fn the_bits_of_each_kind_differ() {
        assert_eq!(Due::Settle.bit() & Due::Login.bit(), 0);
    }
}
