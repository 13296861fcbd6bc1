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
//!
//! # Known empty inboxes (embedded core)
//! Every stored message passes its recipient's owner on its way out (the live copy's route,
//! sent after the message was handed to the core), and every login registers with it first,
//! so the owner sees, in one order, each user's stored messages and sessions. An offline user
//! is marked **clean** when its last session ended having found the store empty at its login
//! drain (a first chunk with nothing in it, read completely) and no stored message was routed
//! to the user since that session registered ([`Presence::unregister`]); a stored message
//! routed to the user afterwards clears the mark ([`Presence::stored_routed`]). A login that
//! finds the mark ([`Presence::take_clean`]) skips its drain: nothing can be stored for it.
//! Why: a message routed before the registration was handed to the core before the drain was
//! (the core reads every queue before it serves a drain), so an empty drain saw it acked or
//! never stored; one routed after it clears the mark or marks its session. The mark lives in
//! the bounded last-seen map: forgotten, the next login drains as before. Cluster edges keep no
//! marks (their drains are served by the cluster core, which gives no such order).

use foldhash::HashMap;

use iris_core::api::ConnId;

use crate::bounded::BoundedLru;

#[derive(Debug, Default)]
struct Entry {
    /// (shard, connection, generation of the registration); never empty (the entry is removed
    /// with its last session).
    sessions: Vec<(usize, ConnId, u64)>,
    /// The generation when a stored message was last routed to the user (0: none): a session
    /// registered at a greater generation had it before its drain.
    routed: u64,
}

/// What the other edges announced about one user.
#[derive(Debug, Default)]
struct Remote {
    /// Nodes where the user is online, with the Unix ms of the login they announced; never
    /// empty (the entry is removed with its last node).
    nodes: Vec<(u32, u64)>,
}

/// Last-seen seconds of offline users, at most `max` names, the least recently written
/// forgotten first, each with its clean mark (the top bit, [`CLEAN`]). An LRU list ordered by
/// write: a write moves its name to the back, so the structure holds exactly one entry per name
/// (the write-ordered queue it replaces kept a stale entry per rewrite, up to twice `max` of
/// them, and then swept them all in one pass: about two million entries, tens of MB and a long
/// stall of the shard, for a million rewrites).
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
        self.map.peek(user).map_or(0, |v| v & !CLEAN)
    }

    /// Records `secs` for `user` (keeping the later of the two) and whether its inbox is known
    /// empty.
    fn set(&mut self, user: &[u8], secs: u64, clean: bool) {
        let mark = if clean { CLEAN } else { 0 };
        let secs = secs & !CLEAN;
        match self.map.get_mut(user) {
            Some(v) => *v = (*v & !CLEAN).max(secs) | mark,
            None => self.map.insert(user.into(), secs | mark),
        }
    }

    /// Clears `user`'s clean mark; true if it was set.
    fn take_clean(&mut self, user: &[u8]) -> bool {
        match self.map.peek_mut(user) {
            Some(v) if *v & CLEAN != 0 => {
                *v &= !CLEAN;
                true
            }
            _ => false,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The clean mark in a [`LastSeen`] value: the user's inbox is known empty (see the module's
/// "Known empty inboxes"). Seconds never reach it.
const CLEAN: u64 = 1 << 63;

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

    /// Records a session of `user` on (`shard`, `conn`). Call [`Presence::take_clean`] first
    /// to learn whether its drain can be skipped.
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

    /// Ends a session; the last one to end sets last-seen to `now_secs`. `drained_empty`: the
    /// session's login drain found nothing (or was skipped as clean); with no stored message
    /// routed to the user since the session registered, the user is marked clean.
    pub fn unregister(
        &mut self,
        user: &[u8],
        shard: usize,
        conn: ConnId,
        now_secs: u64,
        drained_empty: bool,
    ) {
        if let Some(e) = self.users.get_mut(user) {
            let Some(i) = e
                .sessions
                .iter()
                .position(|&(s, c, _)| (s, c) == (shard, conn))
            else {
                return;
            };
            let (_, _, generation) = e.sessions.remove(i);
            if e.sessions.is_empty() {
                let clean = drained_empty && e.routed < generation;
                self.users.remove(user);
                self.seen.set(user, now_secs, clean);
            }
        }
    }

    /// A login of `user` with no session here: true when its inbox is known empty (the clean
    /// mark, which this takes: the new session decides it again when it ends).
    pub fn take_clean(&mut self, user: &[u8]) -> bool {
        !self.is_local(user) && self.seen.take_clean(user)
    }

    /// A stored message is being routed to `user`: its sessions registered so far may not
    /// have drained it, and an offline user's inbox is no longer known empty.
    pub fn stored_routed(&mut self, user: &[u8]) {
        match self.users.get_mut(user) {
            Some(e) => e.routed = self.generation,
            None => {
                self.seen.take_clean(user);
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
            self.seen.set(user, unix_ms / 1000, false);
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
            self.seen.set(&user, unix_ms / 1000, false);
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
        p.unregister(b"a", 0, 1, 100, false);
        assert_eq!(p.status(b"a"), (true, 0));
        p.unregister(b"a", 1, 7, 200, false);
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
            p.unregister(u.as_bytes(), 0, i, 100 + i, false);
        }
        assert_eq!(p.users_len(), 0, "no entry without a session");
        assert_eq!(p.last_seen_len(), 3);
        assert_eq!(p.status(b"u9"), (false, 109));
        assert_eq!(p.status(b"u7"), (false, 107));
        assert_eq!(p.status(b"u0"), (false, 0), "forgotten: never seen");
        // Seen again: refreshed, not duplicated.
        p.register(b"u7", 0, 1);
        p.unregister(b"u7", 0, 1, 200, false);
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
            seen.set(u, 10 + i as u64, false);
        }
        for round in 0..1000 {
            seen.set(b"a", 20 + round, false);
        }
        assert_eq!(seen.len(), 3);
        seen.set(b"d", 30, false);
        assert_eq!(seen.get(b"b"), 0, "b was written least recently");
        assert_eq!(seen.get(b"a"), 1019);
        assert_eq!(seen.get(b"c"), 12);
        assert_eq!(seen.get(b"d"), 30);
        // An older time never replaces a later one.
        seen.set(b"d", 5, false);
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
        p.unregister(b"a", 1, 3, 10, false);
        assert!(p.sessions_after(b"a", g).is_empty());
    }

    /// A user is clean only when its last session drained nothing and no stored message was
    /// routed to it since that session registered; a route to the offline user clears it.
    #[test]
    fn an_inbox_is_known_empty_only_while_nothing_was_routed_since_an_empty_drain() {
        let mut p = Presence::default();
        assert!(!p.take_clean(b"a"), "never seen: not known");
        p.register(b"a", 0, 1);
        p.unregister(b"a", 0, 1, 10, true);
        assert_eq!(p.status(b"a"), (false, 10), "the mark is not a time");
        p.register(b"b", 0, 9); // other users' sessions change nothing
        assert!(p.take_clean(b"a"));
        assert!(!p.take_clean(b"a"), "taken by the login");
        p.register(b"a", 0, 2);

        // A stored message routed to the session: it may not be acked when the session ends.
        p.stored_routed(b"a");
        p.unregister(b"a", 0, 2, 20, true);
        assert!(!p.take_clean(b"a"));

        // A session whose drain found messages (or could not read) is not clean either.
        p.register(b"a", 0, 3);
        p.unregister(b"a", 0, 3, 30, false);
        assert!(!p.take_clean(b"a"));

        // Routed before the session registered: its drain saw it.
        p.register(b"a", 1, 4);
        p.stored_routed(b"a");
        p.register(b"a", 0, 5);
        p.unregister(b"a", 1, 4, 40, false);
        assert!(!p.take_clean(b"a"), "online: no mark");
        p.unregister(b"a", 0, 5, 41, true);
        assert!(
            p.take_clean(b"a"),
            "the last session's empty drain came after the route"
        );

        // A stored message to the offline user clears the mark.
        p.register(b"a", 0, 6);
        p.unregister(b"a", 0, 6, 50, true);
        p.stored_routed(b"a");
        assert!(!p.take_clean(b"a"));

        // Online elsewhere: a login while another session lives is not skipped.
        p.register(b"a", 0, 7);
        p.unregister(b"a", 0, 7, 60, true);
        p.register(b"a", 1, 8);
        assert!(!p.take_clean(b"a"), "the mark was taken by the first login");
        // An unknown session's end changes nothing.
        p.unregister(b"a", 1, 99, 70, true);
        assert!(p.is_local(b"a"));
    }

    /// What one step of the property test below does.
    #[derive(Debug, Clone)]
    enum Op {
        /// A LOGIN of user `u` on connection `c` (ignored if `c` is logged in); `fails`: the
        /// drain cannot read the store.
        Login { c: u64, u: usize, fails: bool },
        /// A message stored for user `u` and routed through its owner.
        Route { u: usize },
        /// Connection `c` acks its `k`-th received message still stored.
        Ack { c: u64, k: usize },
        /// Connection `c`'s session ends.
        Logout { c: u64 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..4u64, 0..4usize, proptest::bool::weighted(0.1))
                .prop_map(|(c, u, fails)| Op::Login { c, u, fails }),
            (0..4usize).prop_map(|u| Op::Route { u }),
            (0..4u64, 0..3usize).prop_map(|(c, k)| Op::Ack { c, k }),
            (0..4u64).prop_map(|c| Op::Logout { c }),
        ]
    }

    proptest::proptest! {
        /// Against a model of what is stored per user: a login told "clean" never has a
        /// stored message to miss, whatever the order of logins, stored routes, acks and
        /// logouts (several sessions per user, failed drain reads, a last-seen map of 3 for 4
        /// users so marks are forgotten). The drain is modelled as served at the registration:
        /// the core's order makes it see every message routed before (module docs).
        #[test]
        fn a_clean_login_never_hides_a_stored_message(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            use std::collections::{BTreeMap, BTreeSet};
            struct Session { u: usize, got: Vec<u64>, drained_empty: bool }
            let names = [&b"u0"[..], b"u1", b"u2", b"u3"];
            let mut p = Presence::new(3);
            let mut stored: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 4];
            let mut sessions: BTreeMap<u64, Session> = BTreeMap::new();
            let mut next_id = 1u64;
            for op in ops {
                match op {
                    Op::Login { c, u, fails } => {
                        if sessions.contains_key(&c) {
                            continue;
                        }
                        let clean = p.take_clean(names[u]);
                        p.register(names[u], 0, c);
                        if clean {
                            proptest::prop_assert!(
                                stored[u].is_empty(),
                                "user {} told clean with {:?} stored", u, stored[u]
                            );
                        }
                        let got: Vec<u64> = if clean || fails {
                            Vec::new()
                        } else {
                            stored[u].iter().copied().collect()
                        };
                        let drained_empty = clean || (!fails && got.is_empty());
                        sessions.insert(c, Session { u, got, drained_empty });
                    }
                    Op::Route { u } => {
                        let id = next_id;
                        next_id += 1;
                        stored[u].insert(id);
                        p.stored_routed(names[u]);
                        for s in sessions.values_mut().filter(|s| s.u == u) {
                            s.got.push(id);
                        }
                    }
                    Op::Ack { c, k } => {
                        if let Some(s) = sessions.get(&c) {
                            let live: Vec<u64> = s
                                .got
                                .iter()
                                .copied()
                                .filter(|id| stored[s.u].contains(id))
                                .collect();
                            if let Some(id) = live.get(k) {
                                stored[s.u].remove(id);
                            }
                        }
                    }
                    Op::Logout { c } => {
                        if let Some(s) = sessions.remove(&c) {
                            p.unregister(names[s.u], 0, c, 1, s.drained_empty);
                        }
                    }
                }
            }
        }
    }

    /// The mark lives in the bounded last-seen map: a forgotten user drains again.
    #[test]
    fn a_forgotten_user_is_not_known_empty() {
        let mut p = Presence::new(2);
        for (i, u) in [&b"a"[..], b"b", b"c"].into_iter().enumerate() {
            p.register(u, 0, i as u64);
            p.unregister(u, 0, i as u64, 10, true);
        }
        assert!(!p.take_clean(b"a"), "forgotten");
        assert!(p.take_clean(b"b") && p.take_clean(b"c"));
        // A later time keeps its own mark.
        p.register(b"c", 0, 5);
        p.unregister(b"c", 0, 5, 20, false);
        assert_eq!(p.status(b"c"), (false, 20));
        assert!(!p.take_clean(b"c"));
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
        p.unregister(b"b", 0, 1, 4_000, false);
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
