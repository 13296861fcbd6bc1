//! What a v2 HELLO's `resume_after` may acknowledge (docs/PROTOCOL-v2.md, "resume_after").
//!
//! When a v2 session ends, its edge shard sends the ids of the messages it wrote to the client
//! and did not see acked, in the order they were written ([`crate::api::CoreRequest::Delivered`]).
//! [`ResumeLists`] keeps the latest such list per user. The next session's first drain names
//! the HELLO's `resume_after` = X; [`ResumeLists::take`] then returns the ids of that list up to
//! and including X in write order that are ≤ X, and those are acked before the drain is served.
//!
//! Why this rule and not "every stored id ≤ X": ids are minted per shard and edge and ordered by
//! time, not one sequence, so a message with an id below X can be stored after the client
//! processed X (minted earlier on another shard, edge or region, and slower to arrive) and the
//! client has never seen it. A message written to the same connection before X was received by
//! the client before X (one ordered byte stream), so a client that processed X, and processes
//! messages in the order it receives them, has processed it. Anything else, including every
//! message written after X and every message of a list that does not contain X, is delivered
//! again as before.
//!
//! Bounded: at most [`crate::api::RESUME_IDS_MAX`] ids per list (the edge keeps the last ones)
//! and [`RESUME_USERS_MAX`] users; beyond that the oldest list is forgotten (its user then gets
//! its unacked messages again, which is v2's at-least-once delivery anyway). Kept in memory
//! only: a restart forgets every list.

use std::collections::{BTreeMap, HashMap};

/// Most users whose list a [`ResumeLists`] keeps by default: each list holds at most
/// [`crate::api::RESUME_IDS_MAX`] ids (8 KiB), and with clients that ack, a few.
pub const RESUME_USERS_MAX: usize = 65_536;

/// Per user, the ids written to its last v2 session (in write order); the oldest list is
/// forgotten first when more than `cap` users have one.
#[derive(Debug)]
pub struct ResumeLists {
    lists: HashMap<Vec<u8>, (u64, Vec<u64>)>,
    /// `seq -> user`, the order the lists came in.
    order: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
    cap: usize,
}

impl Default for ResumeLists {
    fn default() -> Self {
        Self::with_cap(RESUME_USERS_MAX)
    }
}

impl ResumeLists {
    /// Keeps the lists of at most `cap` users (at least 1).
    pub fn with_cap(cap: usize) -> Self {
        Self {
            lists: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            cap: cap.max(1),
        }
    }

    /// Replaces `user`'s list with `ids` (in write order); returns how many other users' lists
    /// were forgotten to stay within the cap.
    pub fn put(&mut self, user: Vec<u8>, ids: Vec<u64>) -> usize {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((old, _)) = self.lists.insert(user.clone(), (seq, ids)) {
            self.order.remove(&old);
        }
        self.order.insert(seq, user);
        let mut evicted = 0;
        while self.lists.len() > self.cap {
            let Some((_, u)) = self.order.pop_first() else {
                break;
            };
            self.lists.remove(&u);
            evicted += 1;
        }
        evicted
    }

    /// Takes `user`'s list and returns the ids a HELLO with `resume_after` acknowledges: those
    /// written up to and including `resume_after` that are ≤ `resume_after`; none when
    /// `resume_after` is not in the list (see the module doc).
    pub fn take(&mut self, user: &[u8], resume_after: u64) -> Vec<u64> {
        let Some((seq, ids)) = self.lists.remove(user) else {
            return Vec::new();
        };
        self.order.remove(&seq);
        match ids.iter().position(|&id| id == resume_after) {
            Some(pos) => ids[..=pos]
                .iter()
                .copied()
                .filter(|&id| id <= resume_after)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Users with a list.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// True when no user has a list.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only ids written before `resume_after` (and it) and not above it are acknowledged; an id
    /// written after it, even a smaller one, is not; a list without it acknowledges nothing.
    #[test]
    fn only_what_was_written_up_to_resume_after_is_taken() {
        let mut r = ResumeLists::default();
        // Written in this order: 50 and 70 before 100, then 60 (a smaller id from another
        // shard, written after 100), then 120.
        r.put(b"bob".to_vec(), vec![50, 70, 100, 60, 120]);
        assert_eq!(r.take(b"bob", 100), vec![50, 70, 100]);
        assert!(r.is_empty(), "a list is used once");
        assert!(r.take(b"bob", 100).is_empty());

        r.put(b"bob".to_vec(), vec![50, 70]);
        assert!(r.take(b"bob", 100).is_empty(), "100 was never written");
        // An id above resume_after written before it is not acknowledged either.
        r.put(b"bob".to_vec(), vec![200, 100]);
        assert_eq!(r.take(b"bob", 100), vec![100]);
        assert!(r.take(b"nobody", 1).is_empty());
        r.put(b"bob".to_vec(), vec![5]);
        assert!(r.take(b"bob", 0).is_empty(), "0: none");
    }

    /// A newer list replaces a user's older one; beyond the cap the oldest user's list goes.
    #[test]
    fn lists_are_replaced_and_bounded_oldest_first() {
        let mut r = ResumeLists::with_cap(2);
        assert_eq!(r.put(b"a".to_vec(), vec![1]), 0);
        assert_eq!(r.put(b"b".to_vec(), vec![2]), 0);
        assert_eq!(r.put(b"a".to_vec(), vec![3]), 0, "replaced, not added");
        assert_eq!(r.len(), 2);
        assert_eq!(r.put(b"c".to_vec(), vec![4]), 1);
        assert!(r.take(b"b", 2).is_empty(), "b was the oldest");
        assert_eq!(r.take(b"a", 3), vec![3]);
        assert!(r.take(b"a", 1).is_empty());
        assert_eq!(r.take(b"c", 4), vec![4]);
    }
}
