//! A shard's slice of presence: the users whose name hashes to this shard.
//!
//! For each such user: the sessions that are logged in (shard, connection), and the Unix second
//! of the last disconnect. A user is online while any session lives (no expiry while connected)
//! and offline with its last-seen time after the last one ends. Only the owning shard touches
//! its slice; other shards reach it over the rings.

use std::collections::HashMap;

use iris_core::api::ConnId;

#[derive(Debug, Default)]
struct Entry {
    sessions: Vec<(usize, ConnId)>,
    last_seen: u64,
}

/// Presence of the users owned by one shard.
#[derive(Debug, Default)]
pub struct Presence {
    users: HashMap<Box<[u8]>, Entry>,
}

impl Presence {
    /// Records a session of `user` on (`shard`, `conn`).
    pub fn register(&mut self, user: &[u8], shard: usize, conn: ConnId) {
        let e = self.users.entry(user.into()).or_default();
        if !e.sessions.contains(&(shard, conn)) {
            e.sessions.push((shard, conn));
        }
    }

    /// Ends a session; the last one to end sets last-seen to `now_secs`.
    pub fn unregister(&mut self, user: &[u8], shard: usize, conn: ConnId, now_secs: u64) {
        if let Some(e) = self.users.get_mut(user) {
            e.sessions.retain(|&s| s != (shard, conn));
            if e.sessions.is_empty() {
                e.last_seen = now_secs;
                e.sessions = Vec::new();
            }
        }
    }

    /// Where `user` is logged in.
    pub fn sessions(&self, user: &[u8]) -> Vec<(usize, ConnId)> {
        self.users
            .get(user)
            .map(|e| e.sessions.clone())
            .unwrap_or_default()
    }

    /// `(online, last_seen)`: last_seen is 0 while online or never seen.
    pub fn status(&self, user: &[u8]) -> (bool, u64) {
        match self.users.get(user) {
            Some(e) if !e.sessions.is_empty() => (true, 0),
            Some(e) => (false, e.last_seen),
            None => (false, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_until_last_session_ends() {
        let mut p = Presence::default();
        assert_eq!(p.status(b"a"), (false, 0));
        p.register(b"a", 0, 1);
        p.register(b"a", 1, 7);
        assert_eq!(p.status(b"a"), (true, 0));
        p.unregister(b"a", 0, 1, 100);
        assert_eq!(p.status(b"a"), (true, 0));
        p.unregister(b"a", 1, 7, 200);
        assert_eq!(p.status(b"a"), (false, 200));
        assert!(p.sessions(b"a").is_empty());
        p.register(b"a", 1, 9);
        assert_eq!(p.sessions(b"a"), vec![(1, 9)]);
    }
}
