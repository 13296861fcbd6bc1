//! A shard's slice of presence: the users whose name hashes to this shard.
//!
//! For each such user: the sessions that are logged in on this edge (shard, connection), and the
//! Unix second of the last disconnect. A user is online while any session lives (no expiry while
//! connected) and offline with its last-seen time after the last one ends. Only the owning shard
//! touches its slice; other shards reach it over the rings.
//!
//! In a cluster the slice also caches what the other edges of the region announced on the
//! presence topic ([`Presence::remote_event`]): the nodes where the user is online, and the
//! last-seen second of the last logout there. Events reach the cache a few milliseconds to a
//! few seconds after they happen (the design accepts 1–5 s of staleness). When a node restarts
//! ([`Presence::reset_node`]) every user it had announced is taken offline, and events that node
//! stamped before its restart are ignored if they arrive late. The sender's edge reads the
//! cached nodes ([`Presence::remote_nodes`]) to send a message's live copy straight to the edges
//! holding its recipient.
//!
//! Bounded: a user's entry is removed when its last session ends; its last-seen second moves to
//! a map of offline users holding at most `presence_last_seen_max / shards` names, the least
//! recently written forgotten first (then read as never seen; an LRU list, one entry per name). Remote entries likewise: a user no other edge
//! holds keeps only its last-seen second, in the same bounded map.
//!
//! Every registration gets a generation number, increasing per shard
//! ([`Presence::generation`]): the owner remembers, with each message id it routed, the
//! generation at that moment, so a second copy of the message (from the other bus path) is
//! written only to sessions that registered since ([`Presence::sessions_after`]).

use foldhash::HashMap;

use iris_core::api::ConnId;

use crate::bounded::BoundedLru;

#[derive(Debug, Default)]
struct Entry {
    /// (shard, connection, generation of the registration); never empty (the entry is removed
    /// with its last session).
    sessions: Vec<(usize, ConnId, u64)>,
}

/// What the other edges announced about one user.
#[derive(Debug, Default)]
struct Remote {
    /// Nodes where the user is online, with the Unix ms of the login they announced; never
    /// empty (the entry is removed with its last node).
    nodes: Vec<(u32, u64)>,
}

/// Last-seen seconds of offline users, at most `max` names, the least recently written
/// forgotten first. An LRU list ordered by write: a write moves its name to the back, so the
/// structure holds exactly one entry per name (the write-ordered queue it replaces kept a stale
/// entry per rewrite, up to twice `max` of them, and then swept them all in one pass: about two
/// million entries, tens of MB and a long stall of the shard, for a million rewrites).
#[derive(Debug)]
struct LastSeen {
    map: BoundedLru<Box<[u8]>, u64>,
}

impl LastSeen {
    fn new(max: usize) -> Self {
        Self {
            map: BoundedLru::new(max),
        }
    }

    fn get(&self, user: &[u8]) -> u64 {
        self.map.peek(user).copied().unwrap_or(0)
    }

    /// Records `secs` for `user` (keeping the later of the two).
    fn set(&mut self, user: &[u8], secs: u64) {
        match self.map.get_mut(user) {
            Some(at) => *at = (*at).max(secs),
            None => self.map.insert(user.into(), secs),
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

impl Default for LastSeen {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

/// Presence of the users owned by one shard.
#[derive(Debug, Default)]
pub struct Presence {
    users: HashMap<Box<[u8]>, Entry>,
    remote: HashMap<Box<[u8]>, Remote>,
    /// Offline users' last-seen seconds (local and remote logouts), bounded.
    seen: LastSeen,
    /// Per node: the Unix ms of its last restart; its events stamped earlier are stale.
    resets: HashMap<u32, u64>,
    /// The generation of the latest registration (0: none yet).
    generation: u64,
}

impl Presence {
    /// An empty slice remembering the last-seen time of at most `last_seen_max` offline users.
    pub fn new(last_seen_max: usize) -> Self {
        Self {
            seen: LastSeen::new(last_seen_max),
            ..Self::default()
        }
    }

    /// Users with at least one session here (the size of the session map).
    pub fn users_len(&self) -> usize {
        self.users.len()
    }

    /// Offline users whose last-seen time is remembered.
    pub fn last_seen_len(&self) -> usize {
        self.seen.len()
    }

    /// Records a session of `user` on (`shard`, `conn`).
    pub fn register(&mut self, user: &[u8], shard: usize, conn: ConnId) {
        let e = self.users.entry(user.into()).or_default();
        if !e.sessions.iter().any(|&(s, c, _)| (s, c) == (shard, conn)) {
            self.generation += 1;
            e.sessions.push((shard, conn, self.generation));
        }
    }

    /// The generation of the latest registration on this shard: a session registered later has
    /// a greater one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Ends a session; the last one to end sets last-seen to `now_secs`.
    pub fn unregister(&mut self, user: &[u8], shard: usize, conn: ConnId, now_secs: u64) {
        if let Some(e) = self.users.get_mut(user) {
            e.sessions.retain(|&(s, c, _)| (s, c) != (shard, conn));
            if e.sessions.is_empty() {
                self.users.remove(user);
                self.seen.set(user, now_secs);
            }
        }
    }

    /// Where `user` is logged in.
    pub fn sessions(&self, user: &[u8]) -> Vec<(usize, ConnId)> {
        self.sessions_after(user, 0)
    }

    /// Where `user` is logged in with a registration newer than generation `after`.
    pub fn sessions_after(&self, user: &[u8], after: u64) -> Vec<(usize, ConnId)> {
        self.users.get(user).map_or_else(Vec::new, |e| {
            e.sessions
                .iter()
                .filter(|&&(_, _, g)| g > after)
                .map(|&(s, c, _)| (s, c))
                .collect()
        })
    }

    /// The other edges of the region where `user` is online, as announced on the presence
    /// topic (empty when none is known).
    pub fn remote_nodes(&self, user: &[u8]) -> Vec<u32> {
        self.remote
            .get(user)
            .map_or_else(Vec::new, |r| r.nodes.iter().map(|&(n, _)| n).collect())
    }

    /// True when `user` has at least one session on this edge.
    pub fn is_local(&self, user: &[u8]) -> bool {
        self.users.get(user).is_some_and(|e| !e.sessions.is_empty())
    }

    /// `(online, last_seen)`: online when a session lives here or another edge announced one;
    /// last_seen is 0 while online or never seen, else the latest logout known.
    pub fn status(&self, user: &[u8]) -> (bool, u64) {
        let local = self.users.get(user);
        let remote = self.remote.get(user);
        if local.is_some_and(|e| !e.sessions.is_empty())
            || remote.is_some_and(|r| !r.nodes.is_empty())
        {
            return (true, 0);
        }
        (false, self.seen.get(user))
    }

    /// Another edge, `node`, announced that `user` went online or offline at `unix_ms`.
    pub fn remote_event(&mut self, user: &[u8], node: u32, online: bool, unix_ms: u64) {
        if self.resets.get(&node).is_some_and(|&r| unix_ms < r) {
            return; // from before that node restarted
        }
        if online {
            let r = self.remote.entry(user.into()).or_default();
            match r.nodes.iter_mut().find(|(n, _)| *n == node) {
                Some((_, at)) => *at = (*at).max(unix_ms),
                None => r.nodes.push((node, unix_ms)),
            }
        } else {
            if let Some(r) = self.remote.get_mut(user) {
                r.nodes.retain(|&(n, _)| n != node);
                if r.nodes.is_empty() {
                    self.remote.remove(user);
                }
            }
            self.seen.set(user, unix_ms / 1000);
        }
    }

    /// Edge `node` restarted at `unix_ms`: none of the sessions it announced before that live.
    /// Those users go offline, last seen at the restart (the crash time is not known); logins
    /// it announced after the restart stay, whichever order the events are read in.
    pub fn reset_node(&mut self, node: u32, unix_ms: u64) {
        let r = self.resets.entry(node).or_default();
        if *r >= unix_ms {
            return;
        }
        *r = unix_ms;
        let mut gone = Vec::new();
        for (user, e) in self.remote.iter_mut() {
            if let Some(i) = e
                .nodes
                .iter()
                .position(|&(n, at)| n == node && at < unix_ms)
            {
                e.nodes.swap_remove(i);
                if e.nodes.is_empty() {
                    gone.push(user.clone());
                }
            }
        }
        for user in gone {
            self.remote.remove(&user);
            self.seen.set(&user, unix_ms / 1000);
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

    #[test]
    fn entries_go_with_the_last_session_and_last_seen_is_bounded() {
        let mut p = Presence::new(3);
        for i in 0..10u64 {
            let u = format!("u{i}");
            p.register(u.as_bytes(), 0, i);
            p.unregister(u.as_bytes(), 0, i, 100 + i);
        }
        assert_eq!(p.users_len(), 0, "no entry without a session");
        assert_eq!(p.last_seen_len(), 3);
        assert_eq!(p.status(b"u9"), (false, 109));
        assert_eq!(p.status(b"u7"), (false, 107));
        assert_eq!(p.status(b"u0"), (false, 0), "forgotten: never seen");
        // Seen again: refreshed, not duplicated.
        p.register(b"u7", 0, 1);
        p.unregister(b"u7", 0, 1, 200);
        assert_eq!(p.status(b"u7"), (false, 200));
        assert_eq!(p.last_seen_len(), 3);
        // Remote users too: one no edge holds any more keeps only its last-seen time.
        p.remote_event(b"r", 2, true, 1_000);
        p.remote_event(b"r", 2, false, 300_000);
        assert!(p.remote.is_empty());
        assert_eq!(p.status(b"r"), (false, 300));
        for i in 0..1000u64 {
            p.remote_event(format!("x{i}").as_bytes(), 3, false, 5_000);
        }
        assert_eq!(p.last_seen_len(), 3);
    }

    /// The name forgotten is the one written least recently: a rewrite keeps a name, and
    /// rewrites add no entries.
    #[test]
    fn last_seen_forgets_the_least_recently_written() {
        let mut seen = LastSeen::new(3);
        for (i, u) in [&b"a"[..], b"b", b"c"].into_iter().enumerate() {
            seen.set(u, 10 + i as u64);
        }
        for round in 0..1000 {
            seen.set(b"a", 20 + round);
        }
        assert_eq!(seen.len(), 3);
        seen.set(b"d", 30);
        assert_eq!(seen.get(b"b"), 0, "b was written least recently");
        assert_eq!(seen.get(b"a"), 1019);
        assert_eq!(seen.get(b"c"), 12);
        assert_eq!(seen.get(b"d"), 30);
        // An older time never replaces a later one.
        seen.set(b"d", 5);
        assert_eq!(seen.get(b"d"), 30);
    }

    #[test]
    fn generations_tell_sessions_registered_later() {
        let mut p = Presence::default();
        assert_eq!(p.generation(), 0);
        p.register(b"a", 0, 1);
        p.register(b"b", 1, 2);
        let g = p.generation();
        assert_eq!(g, 2);
        p.register(b"a", 0, 1); // the same session again: no new generation
        assert_eq!(p.generation(), g);
        assert!(p.sessions_after(b"a", g).is_empty());
        p.register(b"a", 1, 3);
        assert_eq!(p.sessions_after(b"a", g), vec![(1, 3)]);
        assert_eq!(p.sessions_after(b"a", 0), vec![(0, 1), (1, 3)]);
        p.unregister(b"a", 1, 3, 10);
        assert!(p.sessions_after(b"a", g).is_empty());
    }

    #[test]
    fn remote_nodes_follow_the_announcements() {
        let mut p = Presence::default();
        assert!(p.remote_nodes(b"u").is_empty());
        p.remote_event(b"u", 2, true, 1_000);
        p.remote_event(b"u", 3, true, 1_000);
        p.remote_event(b"u", 2, true, 2_000);
        let mut n = p.remote_nodes(b"u");
        n.sort_unstable();
        assert_eq!(n, vec![2, 3]);
        p.remote_event(b"u", 2, false, 3_000);
        assert_eq!(p.remote_nodes(b"u"), vec![3]);
        p.reset_node(3, 5_000);
        assert!(p.remote_nodes(b"u").is_empty());
        p.register(b"u", 0, 1);
        assert!(
            p.remote_nodes(b"u").is_empty(),
            "local sessions are not remote"
        );
    }

    #[test]
    fn remote_events_and_local_sessions_combine() {
        let mut p = Presence::default();
        p.remote_event(b"b", 2, true, 1_000_000);
        assert_eq!(p.status(b"b"), (true, 0));
        assert!(!p.is_local(b"b"));
        p.register(b"b", 0, 1);
        p.remote_event(b"b", 2, false, 5_000_000);
        assert_eq!(p.status(b"b"), (true, 0), "still connected here");
        p.unregister(b"b", 0, 1, 4_000);
        assert_eq!(p.status(b"b"), (false, 5_000), "the latest logout wins");
        p.remote_event(b"c", 3, false, 7_000_000);
        assert_eq!(p.status(b"c"), (false, 7_000));
    }

    #[test]
    fn a_node_reset_takes_its_users_offline_and_ignores_stale_events() {
        let mut p = Presence::default();
        p.remote_event(b"a", 4, true, 1_000);
        p.remote_event(b"a", 5, true, 1_000);
        p.remote_event(b"z", 4, true, 1_000);
        p.reset_node(4, 60_000);
        assert_eq!(p.status(b"z"), (false, 60));
        assert_eq!(p.status(b"a"), (true, 0), "still on node 5");
        // A late event the node sent before it restarted changes nothing.
        p.remote_event(b"z", 4, true, 59_000);
        assert_eq!(p.status(b"z"), (false, 60));
        // Events after the restart count again.
        p.remote_event(b"z", 4, true, 61_000);
        assert_eq!(p.status(b"z"), (true, 0));
        // A repeated (older or equal) reset is ignored.
        p.reset_node(4, 60_000);
        assert_eq!(p.status(b"z"), (true, 0));
        // A login the node announced after a restart, read before that restart's reset (the
        // events travel on different partitions), survives the reset.
        p.remote_event(b"y", 4, true, 90_500);
        p.reset_node(4, 90_000);
        assert_eq!(p.status(b"y"), (true, 0));
        assert_eq!(
            p.status(b"z"),
            (false, 90),
            "logged in before the second restart"
        );
    }
}
