//! Session store against a real `redis-server`: each test starts its own server on a free
//! loopback port (no persistence) and stops it on drop.
//!
//! A record holds one field per edge node holding the user (several devices, several nodes),
//! each write touches only its own node's field, and fields of dead runs are ignored and
//! pruned; see `core/src/sessions.rs`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use iris_core::sessions::{
    node_field, session_key, SessionConfig, SessionOp, SessionReader, SessionRecord, SessionWriter,
    RUNS_KEY,
};
use iris_tests::services::RedisServer;

/// The run of the edge process in most tests.
const RUN: u64 = 1_700_000_000_000;
const REGION: &str = "eu-west";

/// A connection to this test's server.
trait Conn {
    fn conn(&self) -> redis::Connection;
}

impl Conn for RedisServer {
    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

fn cfg(url: String) -> SessionConfig {
    SessionConfig {
        shutdown_timeout_ms: 1000,
        ..SessionConfig::with_url(url)
    }
}

fn online_run(user: &[u8], node: &str, shard: u16, run: u64) -> SessionOp {
    SessionOp::Online {
        user: user.to_vec(),
        node: node.to_owned(),
        shard,
        region: REGION.to_owned(),
        run,
        login_ms: run + 1 + u64::from(shard),
    }
}

fn online(user: &[u8], node: &str, shard: u16) -> SessionOp {
    online_run(user, node, shard, RUN)
}

fn offline_run(user: &[u8], node: &str, last_seen: u64, run: u64) -> SessionOp {
    SessionOp::Offline {
        user: user.to_vec(),
        node: node.to_owned(),
        region: REGION.to_owned(),
        run,
        last_seen,
    }
}

fn offline(user: &[u8], node: &str, last_seen: u64) -> SessionOp {
    offline_run(user, node, last_seen, RUN)
}

fn hgetall(c: &mut redis::Connection, user: &[u8]) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(session_key(user))
        .query(c)
        .unwrap()
}

fn ttl(c: &mut redis::Connection, user: &[u8]) -> i64 {
    redis::cmd("TTL").arg(session_key(user)).query(c).unwrap()
}

/// Polls `f` until it holds or `secs` pass.
fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Where a record says the user is: (node, shard, region) of each live session, sorted.
type Places = Vec<(String, u16, String)>;

fn places(rec: &SessionRecord) -> Places {
    let mut p: Places = rec
        .sessions
        .iter()
        .map(|s| (s.node.clone(), s.shard, s.region.clone()))
        .collect();
    p.sort();
    p
}

fn at(list: &[(&str, u16)]) -> Places {
    let mut p: Places = list
        .iter()
        .map(|&(n, s)| (n.to_owned(), s, REGION.to_owned()))
        .collect();
    p.sort();
    p
}

/// What the tests compare: the live places and the last logout (`None`: no record).
type View = Option<(Places, u64)>;

fn view(rec: Option<SessionRecord>) -> View {
    rec.map(|r| {
        assert_eq!(r.online, !r.sessions.is_empty(), "{r:?}");
        (places(&r), r.last_seen)
    })
}

fn online_view(list: &[(&str, u16)]) -> View {
    Some((at(list), 0))
}

/// Queues `op`, retrying while the queue is full (the writer drains it).
fn send(sink: &iris_core::sessions::SessionSink, mut op: SessionOp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(back) = sink.try_send(op) {
        assert!(Instant::now() < deadline, "queue stayed full");
        op = back;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The users whose view is not exactly `want`, in one pipelined lookup.
fn mismatches(reader: &SessionReader, want: &[(Vec<u8>, View)]) -> Vec<(String, View)> {
    let users: Vec<&[u8]> = want.iter().map(|(u, _)| u.as_slice()).collect();
    let Ok(got) = reader.get_many(&users) else {
        return vec![("<redis unreachable>".to_owned(), None)];
    };
    want.iter()
        .zip(got)
        .map(|((u, w), g)| (u, w, view(g)))
        .filter(|(_, w, g)| w != &g)
        .map(|(u, _, g)| (String::from_utf8_lossy(u).into_owned(), g))
        .collect()
}

fn dbsize(c: &mut redis::Connection) -> u64 {
    redis::cmd("DBSIZE").query(c).unwrap()
}

#[test]
fn online_writes_the_node_field_the_run_and_ttl() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    sinks[0].try_send(online(b"alice", "1", 3)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 1));
    let mut c = srv.conn();
    let h = hgetall(&mut c, b"alice");
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[&node_field(REGION, "1")], format!("{RUN}/3/{}", RUN + 4));
    let runs: HashMap<String, u64> = redis::cmd("HGETALL").arg(RUNS_KEY).query(&mut c).unwrap();
    assert_eq!(
        runs[&format!("{REGION}/1")],
        RUN,
        "the run table learnt the run"
    );
    let t = ttl(&mut c, b"alice");
    assert!((86_390..=86_400).contains(&t), "ttl {t}");
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let rec = reader.get(b"alice").unwrap().unwrap();
    assert_eq!(rec.online_nodes(REGION), vec![1]);
    assert_eq!(rec.sessions[0].run, RUN);
    assert_eq!(rec.sessions[0].login_ms, RUN + 4);
    assert_eq!((rec.node.as_str(), rec.shard, rec.online), ("1", 3, true));

    // A refresh re-arms the TTL.
    redis::cmd("EXPIRE")
        .arg(session_key(b"alice"))
        .arg(100)
        .exec(&mut c)
        .unwrap();
    sinks[0]
        .try_send(SessionOp::Refresh {
            user: b"alice".to_vec(),
        })
        .unwrap();
    assert!(wait_until(3, || ttl(&mut c, b"alice") > 86_000));
    writer.shutdown().unwrap();
}

#[test]
fn offline_removes_the_node_and_sets_last_seen() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 2).unwrap();
    sinks[0].try_send(online(b"bob", "2", 1)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 1));
    sinks[1]
        .try_send(offline(b"bob", "2", 1_700_000_000))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    let mut c = srv.conn();
    let h = hgetall(&mut c, b"bob");
    assert_eq!(h.len(), 1, "only last_seen is left: {h:?}");
    assert_eq!(h["last_seen"], "1700000000");
    assert!(ttl(&mut c, b"bob") > 86_000);

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let rec = reader.get(b"bob").unwrap().unwrap();
    assert!(!rec.online);
    assert!(rec.online_nodes(REGION).is_empty());
    assert_eq!(view(Some(rec)), Some((vec![], 1_700_000_000)));
    // An earlier logout time never lowers it.
    sinks[0]
        .try_send(offline(b"bob", "2", 1_600_000_000))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 3));
    assert_eq!(hgetall(&mut c, b"bob")["last_seen"], "1700000000");
    writer.shutdown().unwrap();
}

#[test]
fn two_devices_on_two_edges_are_both_online() {
    let srv = RedisServer::start();
    // One writer per edge, as in a deployment.
    let (w1, s1) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (w2, s2) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (m1, m2) = (w1.metrics().clone(), w2.metrics().clone());
    s1[0].try_send(online(b"duo", "1", 0)).unwrap();
    s2[0].try_send(online_run(b"duo", "2", 1, RUN + 5)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 1 && m2.snapshot().writes >= 1));
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let rec = reader.get(b"duo").unwrap().unwrap();
    assert_eq!(rec.online_nodes(REGION), vec![1, 2], "login order");
    assert!(rec.online_nodes("us-east").is_empty());
    assert_eq!(rec.node, "2", "the latest login");
    // The first device logs out: the second stays online.
    s1[0].try_send(offline(b"duo", "1", 1_700_000_010)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 2));
    let rec = reader.get(b"duo").unwrap().unwrap();
    assert_eq!(rec.online_nodes(REGION), vec![2]);
    assert_eq!(rec.last_seen, 1_700_000_010);
    assert!(rec.online);
    w1.shutdown().unwrap();
    w2.shutdown().unwrap();
}

#[test]
fn coalesces_per_user_and_node_latest_wins() {
    let srv = RedisServer::start();
    let c = SessionConfig {
        flush_interval_ms: 100,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    let mut last: HashMap<String, (u32, u32)> = HashMap::new();
    for i in 0..1000u32 {
        let user = format!("user{}", i % 10);
        let op = match i % 3 {
            0 => online(user.as_bytes(), "7", (i % 7) as u16),
            1 => SessionOp::Refresh {
                user: user.clone().into_bytes(),
            },
            _ => offline(user.as_bytes(), "7", u64::from(i)),
        };
        if i % 3 != 1 {
            last.insert(user, (i, i % 3));
        }
        sinks[0].try_send(op).unwrap();
    }
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().pending_users == 0
        && m.snapshot().ops_in == 1000));
    writer.shutdown().unwrap();
    let s = m.snapshot();
    assert_eq!(s.ops_in, 1000);
    assert!(s.writes >= 10 && s.writes <= 40, "writes {}", s.writes);
    assert!(s.pipelines <= 3, "pipelines {}", s.pipelines);
    assert_eq!(s.errors, 0);

    let mut conn = srv.conn();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("session:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 10);
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    for (user, (i, kind)) in last {
        let rec = reader.get(user.as_bytes()).unwrap().unwrap();
        if kind == 0 {
            assert_eq!(places(&rec), at(&[("7", (i % 7) as u16)]), "{user}");
        } else {
            assert!(!rec.online, "{user}");
            assert_eq!(rec.last_seen, u64::from(i), "{user}");
        }
    }
}

#[test]
fn try_send_never_blocks_when_full() {
    // A server that accepts connections and never answers: the writer blocks in its round
    // trip, so the queue fills.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}/", hole.local_addr().unwrap().port());
    let c = SessionConfig {
        channel_capacity: 4,
        connect_timeout_ms: 2000,
        io_timeout_ms: 2000,
        shutdown_timeout_ms: 100,
        ..SessionConfig::with_url(url)
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    let start = Instant::now();
    let mut rejected = None;
    for i in 0..10_000u32 {
        let op = online(format!("u{i}").as_bytes(), "1", 0);
        if let Err(back) = sinks[0].try_send(op.clone()) {
            assert_eq!(back, op, "the op comes back");
            rejected = Some(i);
            break;
        }
    }
    let elapsed = start.elapsed();
    let i = rejected.expect("queue never full");
    assert!(i >= 4, "accepted {i} before full");
    assert!(
        elapsed < Duration::from_millis(500),
        "try_send took {elapsed:?}"
    );
    assert!(writer.metrics().snapshot().rejected >= 1);
    // Further sends keep failing fast.
    let t = Instant::now();
    for _ in 0..1000 {
        let _ = sinks[0].try_send(SessionOp::Refresh {
            user: b"x".to_vec(),
        });
    }
    assert!(t.elapsed() < Duration::from_millis(200));
    drop(hole);
    writer.shutdown().unwrap();
}

#[test]
fn survives_redis_restart_and_writes_latest() {
    let mut srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 2).unwrap();
    let m = writer.metrics().clone();
    for u in 0..20u16 {
        sinks[usize::from(u % 2)]
            .try_send(online(format!("u{u}").as_bytes(), "1", u))
            .unwrap();
    }
    assert!(wait_until(3, || m.snapshot().writes >= 20));

    srv.kill();
    // Ops keep coming while Redis is down: the latest state per user must survive.
    let mut expected = HashMap::new();
    for round in 0..50u16 {
        for u in 0..20u16 {
            let user = format!("u{u}");
            let on = (round + u) % 2 == 0;
            let op = if on {
                online(user.as_bytes(), "1", round)
            } else {
                offline(user.as_bytes(), "1", u64::from(round) + 1)
            };
            expected.insert(user, (on, round));
            send(&sinks[usize::from(u % 2)], op);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(wait_until(3, || m.snapshot().errors >= 1));
    assert!(wait_until(3, || m.snapshot().pending_users == 20));

    srv.restart();
    assert!(
        wait_until(4, || m.snapshot().pending_users == 0),
        "not written after restart: {:?}",
        m.snapshot()
    );
    let s = m.snapshot();
    assert!(s.reconnects >= 1, "{s:?}");

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let users: Vec<String> = (0..20).map(|u| format!("u{u}")).collect();
    let recs = reader.get_many(&users).unwrap();
    for (user, rec) in users.iter().zip(recs) {
        let rec = rec.unwrap_or_else(|| panic!("{user} missing after restart"));
        let (on, round) = expected[user];
        assert_eq!(rec.online, on, "{user}");
        if on {
            assert_eq!(places(&rec), at(&[("1", round)]), "{user}");
        } else {
            assert_eq!(rec.last_seen, 50, "{user}");
        }
    }
    writer.shutdown().unwrap();
}

#[test]
fn reader_get_many_and_missing() {
    let mut srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    sinks[0].try_send(online(b"carol", "9", 9)).unwrap();
    sinks[0].try_send(online(b"dave", "8", 8)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    writer.shutdown().unwrap();

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(reader.get(b"nobody").unwrap(), None);
    let got = reader
        .get_many(&[&b"carol"[..], b"nobody", b"dave"])
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().unwrap().online_nodes(REGION), vec![9]);
    assert_eq!(got[1], None);
    assert_eq!(got[2].as_ref().unwrap().shard, 8);
    assert!(got[2].as_ref().unwrap().online);
    assert!(reader.get_many::<&[u8]>(&[]).unwrap().is_empty());

    // The reader reconnects after Redis restarts (the fresh server is empty).
    srv.restart();
    assert_eq!(reader.get(b"carol").unwrap(), None);
    // And reports an error while Redis is down.
    srv.kill();
    assert!(reader.get(b"carol").is_err());
}

#[test]
fn binary_user_names() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let users: [&[u8]; 3] = [b"a:b:c", b"\xff\xfe\x00:x", b"session:nested"];
    for (i, u) in users.iter().enumerate() {
        sinks[0].try_send(online(u, "3", i as u16)).unwrap();
    }
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 3));
    writer.shutdown().unwrap();

    let mut c = srv.conn();
    for u in users {
        let exists: bool = redis::cmd("EXISTS")
            .arg(session_key(u))
            .query(&mut c)
            .unwrap();
        assert!(exists, "{u:?}");
    }
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let got = reader.get_many(&users).unwrap();
    for (i, rec) in got.into_iter().enumerate() {
        assert_eq!(rec.unwrap().shard, i as u16);
    }
    // Only the exact key: a prefix of a binary name is another user.
    assert_eq!(reader.get(b"\xff\xfe").unwrap(), None);
}

#[test]
fn periodic_refresh_rearms_online_users_only() {
    let srv = RedisServer::start();
    let c = SessionConfig {
        refresh_interval_secs: 1,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    sinks[0].try_send(online(b"on", "4", 1)).unwrap();
    sinks[0].try_send(online(b"off", "4", 2)).unwrap();
    sinks[0].try_send(offline(b"off", "4", 5)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().pending_users == 0
        && m.snapshot().writes >= 2));
    let mut conn = srv.conn();
    for u in [&b"on"[..], b"off"] {
        expire(&mut conn, u, 100);
    }
    assert!(wait_until(3, || m.snapshot().refreshes >= 1));
    assert!(ttl(&mut conn, b"on") > 86_000);
    assert!(ttl(&mut conn, b"off") <= 100);
    writer.shutdown().unwrap();
}

/// Sets the TTL of `user`'s key to `secs`.
fn expire(c: &mut redis::Connection, user: &[u8], secs: u64) {
    redis::cmd("EXPIRE")
        .arg(session_key(user))
        .arg(secs)
        .exec(c)
        .unwrap();
}

#[test]
fn late_offline_from_the_old_node_leaves_the_new_node() {
    let srv = RedisServer::start();
    let (w1, s1) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (w2, s2) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (m1, m2) = (w1.metrics().clone(), w2.metrics().clone());
    let user = b"mover";
    s1[0].try_send(online(user, "1", 4)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 1));
    // The user logs in on node 2 before its connection on node 1 is closed.
    s2[0].try_send(online(user, "2", 6)).unwrap();
    assert!(wait_until(3, || m2.snapshot().writes >= 1));
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        view(reader.get(user).unwrap()),
        online_view(&[("1", 4), ("2", 6)])
    );

    // Node 1's last session ends: node 2's session is untouched.
    s1[0].try_send(offline(user, "1", 1_700_000_100)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 2));
    assert_eq!(
        view(reader.get(user).unwrap()),
        Some((at(&[("2", 6)]), 1_700_000_100))
    );

    // Same node id in another region is another node.
    s1[0]
        .try_send(SessionOp::Offline {
            user: user.to_vec(),
            node: "2".into(),
            region: "us-east".into(),
            run: RUN,
            last_seen: 1_700_000_150,
        })
        .unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 3));
    assert_eq!(
        reader.get(user).unwrap().unwrap().online_nodes(REGION),
        vec![2]
    );

    // Node 2's last session ends: now the user is offline.
    s2[0].try_send(offline(user, "2", 1_700_000_200)).unwrap();
    assert!(wait_until(3, || m2.snapshot().writes >= 2));
    assert_eq!(
        view(reader.get(user).unwrap()),
        Some((vec![], 1_700_000_200))
    );
    let mut c = srv.conn();
    assert!(ttl(&mut c, user) > 86_000, "ttl re-armed by the offline");
    assert_eq!(m1.snapshot().errors + m2.snapshot().errors, 0);
    w1.shutdown().unwrap();
    w2.shutdown().unwrap();
}

#[test]
fn fields_of_a_dead_run_are_ignored_refused_and_pruned() {
    let srv = RedisServer::start();
    let (old, so) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let mo = old.metrics().clone();
    // Run RUN of node 1 announces two users, then is killed (its writer stays, as a process
    // that is slow to die would).
    so[0].try_send(online(b"left", "1", 1)).unwrap();
    so[0].try_send(online(b"back", "1", 2)).unwrap();
    assert!(wait_until(3, || mo.snapshot().writes >= 2));
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        reader.get(b"left").unwrap().unwrap().online_nodes(REGION),
        vec![1]
    );

    // Node 1 restarts as run RUN + 1000 and announces it (its reset, read back).
    let (new, sn) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let mn = new.metrics().clone();
    sn[0]
        .try_send(SessionOp::Announce {
            node: "1".into(),
            region: REGION.into(),
            run: RUN + 1000,
        })
        .unwrap();
    assert!(wait_until(3, || mn.snapshot().writes >= 1));
    // Readers leave the dead run out (once their run table is older than a second).
    let fresh = SessionReader::new(&cfg(srv.url())).unwrap();
    let left = fresh.get(b"left").unwrap().unwrap();
    assert!(!left.online, "{left:?}");
    assert!(wait_until(3, || reader
        .get(b"left")
        .unwrap()
        .is_some_and(|r| !r.online)));

    // "back" logs in again on the new run: its field is the new run's.
    sn[0]
        .try_send(online_run(b"back", "1", 5, RUN + 1000))
        .unwrap();
    assert!(wait_until(3, || mn.snapshot().writes >= 2));
    let rec = fresh.get(b"back").unwrap().unwrap();
    assert_eq!(places(&rec), at(&[("1", 5)]));
    assert_eq!(rec.sessions[0].run, RUN + 1000);
    // The dead run's late writes change nothing: its offline does not remove the new run's
    // session, its online does not take it back.
    so[0]
        .try_send(offline(b"back", "1", 1_700_000_300))
        .unwrap();
    so[0].try_send(online(b"left", "1", 1)).unwrap();
    assert!(wait_until(3, || mo.snapshot().writes >= 4));
    let rec = fresh.get(b"back").unwrap().unwrap();
    assert_eq!(places(&rec), at(&[("1", 5)]));
    assert_eq!(rec.sessions[0].run, RUN + 1000);
    assert!(!fresh.get(b"left").unwrap().unwrap().online);
    // The next online write to "left" (another node) prunes the dead field from the key.
    let (w2, s2) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    s2[0].try_send(online(b"left", "2", 3)).unwrap();
    let m2 = w2.metrics().clone();
    assert!(wait_until(3, || m2.snapshot().writes >= 1));
    let mut c = srv.conn();
    let h = hgetall(&mut c, b"left");
    assert!(!h.contains_key(&node_field(REGION, "1")), "{h:?}");
    assert_eq!(view(fresh.get(b"left").unwrap()), online_view(&[("2", 3)]));
    for w in [old, new, w2] {
        w.shutdown().unwrap();
    }
}

#[test]
fn offline_without_record_creates_offline_record() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let m = writer.metrics().clone();
    sinks[0]
        .try_send(offline(b"ghost", "1", 1_700_000_300))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 1));
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        view(reader.get(b"ghost").unwrap()),
        Some((vec![], 1_700_000_300))
    );
    let mut c = srv.conn();
    assert!(ttl(&mut c, b"ghost") > 86_000);
    sinks[0]
        .try_send(offline(b"ghost", "7", 1_700_000_400))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    assert_eq!(
        view(reader.get(b"ghost").unwrap()),
        Some((vec![], 1_700_000_400))
    );
    assert_eq!(m.snapshot().errors, 0);
    writer.shutdown().unwrap();
}

#[test]
fn online_then_offline_in_one_batch_ends_offline() {
    let srv = RedisServer::start();
    // Another node holds "moved" before it logs in and out on node 1.
    let (w2, s2) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    s2[0].try_send(online(b"moved", "2", 2)).unwrap();
    let m2 = w2.metrics().clone();
    assert!(wait_until(3, || m2.snapshot().writes >= 1));
    w2.shutdown().unwrap();

    let c = SessionConfig {
        flush_interval_ms: 500,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    let m = writer.metrics().clone();
    for (user, shard) in [(&b"fresh"[..], 3u16), (b"moved", 5)] {
        sinks[0].try_send(online(user, "1", shard)).unwrap();
        sinks[0]
            .try_send(offline(user, "1", 1_700_000_500))
            .unwrap();
    }
    assert!(wait_until(3, || m.snapshot().pending_users == 0
        && m.snapshot().ops_in == 4));
    let s = m.snapshot();
    assert_eq!((s.writes, s.pipelines, s.errors), (2, 1, 0), "{s:?}");

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        view(reader.get(b"fresh").unwrap()),
        Some((vec![], 1_700_000_500))
    );
    assert_eq!(
        view(reader.get(b"moved").unwrap()),
        Some((at(&[("2", 2)]), 1_700_000_500)),
        "node 2's session is not node 1's to end"
    );
    let mut conn = srv.conn();
    assert!(ttl(&mut conn, b"moved") > 86_000);
    writer.shutdown().unwrap();
}

#[test]
fn scripts_reload_after_redis_restart_and_old_records_are_replaced() {
    let mut srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let m = writer.metrics().clone();
    // The first writes teach the writer the scripts' SHA1s.
    sinks[0].try_send(online(b"erin", "1", 1)).unwrap();
    sinks[0].try_send(offline(b"erin", "1", 10)).unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 1
        && m.snapshot().pending_users == 0));

    // A fresh server has no scripts: the next pipeline must load them again. It holds a record
    // of the earlier one-node layout, written by an edge of the previous version.
    srv.restart();
    let mut c = srv.conn();
    for (user, node) in [(&b"erin"[..], "1"), (b"fay", "1")] {
        redis::cmd("HSET")
            .arg(session_key(user))
            .arg("node")
            .arg(node)
            .arg("shard")
            .arg(2)
            .arg("region")
            .arg(REGION)
            .arg("last_seen")
            .arg(0)
            .arg("online")
            .arg(1)
            .exec(&mut c)
            .unwrap();
    }
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        reader.get(b"erin").unwrap().unwrap().online_nodes(REGION),
        vec![1]
    );
    let writes = m.snapshot().writes;
    // An offline of that node ends the old record; an online replaces it.
    sinks[0].try_send(offline(b"erin", "1", 20)).unwrap();
    sinks[0].try_send(online(b"fay", "3", 4)).unwrap();
    assert!(
        wait_until(4, || m.snapshot().writes >= writes + 2),
        "{:?}",
        m.snapshot()
    );
    let h = hgetall(&mut c, b"erin");
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h["last_seen"], "20");
    assert_eq!(view(reader.get(b"fay").unwrap()), online_view(&[("3", 4)]));
    // The old connection died with the server: the writer reconnected (and a `NOSCRIPT` would
    // have left the records as they were).
    assert!(m.snapshot().reconnects >= 1, "{:?}", m.snapshot());
    assert_eq!(
        m.snapshot().errors,
        1,
        "only the failed round trip: {:?}",
        m.snapshot()
    );
    writer.shutdown().unwrap();
}

#[test]
fn resyncs_online_sessions_after_redis_restarts_empty() {
    const N: u16 = 5_000;
    let mut srv = RedisServer::start();
    let c = SessionConfig {
        // Many bounded pipelines (over several loop turns) for the resync; no refresh sweep
        // during the test.
        max_batch: 128,
        refresh_interval_secs: 3600,
        // A loaded test machine must not turn a slow round trip into a reconnect (which
        // starts the resync over).
        io_timeout_ms: 5000,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 2).unwrap();
    let m = writer.metrics().clone();
    let mut want = Vec::new();
    for u in 0..N {
        let user = format!("u{u}").into_bytes();
        let shard = u % 16;
        send(&sinks[usize::from(u % 2)], online(&user, "5", shard));
        want.push((user, online_view(&[("5", shard)])));
    }
    // A user who moved shard: the latest location is the one restored. (One queue: the order
    // between two producers' queues is not defined.)
    send(&sinks[0], online(b"mover", "5", 1));
    send(&sinks[0], online(b"mover", "5", 2));
    want.push((b"mover".to_vec(), online_view(&[("5", 2)])));
    // A user who logged out before the restart: not resurrected.
    send(&sinks[0], online(b"gone", "5", 3));
    let total = u64::from(N) + 3;
    assert!(wait_until(10, || m.snapshot().ops_in == total
        && m.snapshot().pending_users == 0));
    send(&sinks[0], offline(b"gone", "5", 1_700_000_000));
    assert!(wait_until(10, || m.snapshot().ops_in == total + 1
        && m.snapshot().pending_users == 0));
    let mut conn = srv.conn();
    // Every user's key and the run table.
    assert_eq!(dbsize(&mut conn), u64::from(N) + 3);
    let before = m.snapshot();
    assert_eq!((before.reconnects, before.resynced), (0, 0), "{before:?}");

    // All data gone; no op comes: the writer must notice on its own and rewrite everyone.
    srv.restart();
    assert!(
        wait_until(8, || m.snapshot().resynced > u64::from(N)),
        "not resynced: {:?}",
        m.snapshot()
    );
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let mut left = Vec::new();
    let back = wait_until(2, || {
        left = mismatches(&reader, &want);
        left.is_empty()
    });
    assert!(
        back,
        "{} users not restored, e.g. {:?}; {:?}",
        left.len(),
        left.first(),
        m.snapshot()
    );
    assert_eq!(
        reader.get(b"gone").unwrap(),
        None,
        "offline user resurrected"
    );
    let mut conn = srv.conn();
    assert_eq!(dbsize(&mut conn), u64::from(N) + 2);
    for u in [&b"u0"[..], b"u4999", b"mover"] {
        assert!(ttl(&mut conn, u) > 86_000, "{u:?}");
    }
    let s = m.snapshot();
    assert!(s.reconnects >= 1, "{s:?}");
    assert!(s.resynced > u64::from(N), "{s:?}");
    assert_eq!(
        s.writes, before.writes,
        "a resync is not an op's write: {s:?}"
    );
    assert_eq!(s.pending_users, 0);
    writer.shutdown().unwrap();
}

#[test]
fn resync_after_restart_yields_to_ops_sent_while_down() {
    let mut srv = RedisServer::start();
    let c = SessionConfig {
        io_timeout_ms: 5000,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    let m = writer.metrics().clone();
    for (u, shard) in [(&b"stays"[..], 1u16), (b"leaves", 2), (b"moves", 3)] {
        send(&sinks[0], online(u, "6", shard));
    }
    assert!(wait_until(3, || m.snapshot().writes >= 3
        && m.snapshot().pending_users == 0));

    srv.kill();
    // While Redis is down: one user logs out, one moves shard, one logs in.
    send(&sinks[0], offline(b"leaves", "6", 1_700_000_600));
    send(&sinks[0], online(b"moves", "6", 7));
    send(&sinks[0], online(b"joins", "6", 8));
    assert!(wait_until(3, || m.snapshot().pending_users == 3));

    // Back empty: the pending ops win over the resync of what was written before.
    srv.restart();
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let want = vec![
        (b"stays".to_vec(), online_view(&[("6", 1)])),
        (b"moves".to_vec(), online_view(&[("6", 7)])),
        (b"joins".to_vec(), online_view(&[("6", 8)])),
        // The offline found no record: offline, the logout time kept.
        (b"leaves".to_vec(), Some((vec![], 1_700_000_600))),
    ];
    let mut left = Vec::new();
    let ok = wait_until(5, || {
        left = mismatches(&reader, &want);
        left.is_empty() && m.snapshot().pending_users == 0 && m.snapshot().resynced >= 1
    });
    assert!(ok, "{left:?}; {:?}", m.snapshot());
    // Stable: nothing rewrites them afterwards.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mismatches(&reader, &want), Vec::new());
    assert!(m.snapshot().reconnects >= 1);
    writer.shutdown().unwrap();
}

#[test]
fn refresh_rewrites_session_deleted_behind_the_writer() {
    let srv = RedisServer::start();
    let c = SessionConfig {
        refresh_interval_secs: 1,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    let m = writer.metrics().clone();
    send(&sinks[0], online(b"kept", "8", 1));
    send(&sinks[0], online(b"deleted", "8", 4));
    send(&sinks[0], online(b"off", "8", 2));
    assert!(wait_until(3, || m.snapshot().ops_in == 3
        && m.snapshot().pending_users == 0));
    // Written after its online (not folded into it): the writer must forget the user.
    send(&sinks[0], offline(b"off", "8", 1_700_000_700));
    assert!(wait_until(3, || m.snapshot().ops_in == 4
        && m.snapshot().pending_users == 0));
    let mut conn = srv.conn();
    let deleted: u64 = redis::cmd("DEL")
        .arg(session_key(b"deleted"))
        .arg(session_key(b"off"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(deleted, 2);
    let refreshes = m.snapshot().refreshes;

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let want = vec![
        (b"kept".to_vec(), online_view(&[("8", 1)])),
        (b"deleted".to_vec(), online_view(&[("8", 4)])),
        // Offline: not the writer's to restore.
        (b"off".to_vec(), None),
    ];
    let mut left = Vec::new();
    let ok = wait_until(5, || {
        left = mismatches(&reader, &want);
        left.is_empty()
    });
    assert!(ok, "{left:?}; {:?}", m.snapshot());
    assert!(ttl(&mut conn, b"deleted") > 86_000);
    // Another sweep later, still only the online users exist.
    assert!(wait_until(3, || m.snapshot().refreshes >= refreshes + 4));
    assert_eq!(mismatches(&reader, &want), Vec::new());
    let s = m.snapshot();
    assert_eq!(s.resynced, 1, "only the missing key is rewritten: {s:?}");
    assert_eq!((s.reconnects, s.errors), (0, 0), "{s:?}");
    writer.shutdown().unwrap();
}

/// Users hop between two edges again and again (login on the new edge first, then the old
/// connection closes), each edge's writer writing at its own pace, with Redis restarted empty
/// in the middle (both writers resync): at the end every record points exactly where its user
/// is, nowhere else.
#[test]
fn users_hopping_between_edges_end_where_they_are() {
    const USERS: usize = 200;
    const HOPS: usize = 30;
    let mut srv = RedisServer::start();
    let c = |flush| SessionConfig {
        flush_interval_ms: flush,
        io_timeout_ms: 5000,
        ..cfg(srv.url())
    };
    // Different flush intervals: the two edges' writes interleave in every order.
    let (w1, s1) = SessionWriter::start(c(1), 1).unwrap();
    let (w2, s2) = SessionWriter::start(c(7), 1).unwrap();
    let (m1, m2) = (w1.metrics().clone(), w2.metrics().clone());
    let sinks = [&s1[0], &s2[0]];
    let nodes = ["1", "2"];
    // Edge 2 restarted once before: its run is newer than edge 1's.
    let runs = [RUN, RUN + 77];
    let mut on = vec![0usize; USERS];
    for (u, at) in on.iter_mut().enumerate() {
        let user = format!("h{u}");
        *at = u % 2;
        send(
            sinks[*at],
            online_run(user.as_bytes(), nodes[*at], 0, runs[*at]),
        );
    }
    for hop in 0..HOPS {
        for (u, at) in on.iter_mut().enumerate() {
            if (u + hop) % 3 == 0 {
                continue; // this one stays put this round
            }
            let user = format!("h{u}");
            let (from, to) = (*at, 1 - *at);
            let shard = (hop % 4) as u16;
            send(
                sinks[to],
                online_run(user.as_bytes(), nodes[to], shard, runs[to]),
            );
            send(
                sinks[from],
                offline_run(
                    user.as_bytes(),
                    nodes[from],
                    1_700_000_000 + hop as u64,
                    runs[from],
                ),
            );
            *at = to;
        }
        if hop == HOPS / 2 {
            srv.restart();
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let users: Vec<Vec<u8>> = (0..USERS).map(|u| format!("h{u}").into_bytes()).collect();
    let exact = |recs: &[Option<SessionRecord>]| -> Vec<(usize, usize, Option<SessionRecord>)> {
        recs.iter()
            .zip(&on)
            .enumerate()
            .filter(|(_, (r, &at))| {
                !r.as_ref().is_some_and(|r| {
                    r.online_nodes(REGION) == vec![nodes[at].parse::<u32>().unwrap()]
                })
            })
            .map(|(u, (r, &at))| (u, at, r.clone()))
            .collect()
    };
    let mut wrong = Vec::new();
    let ok = wait_until(10, || {
        let idle = m1.snapshot().pending_users == 0 && m2.snapshot().pending_users == 0;
        wrong = match reader.get_many(&users) {
            Ok(recs) => exact(&recs),
            Err(e) => vec![(0, 0, None)]
                .into_iter()
                .inspect(|_| eprintln!("{e}"))
                .collect(),
        };
        idle && wrong.is_empty()
    });
    wrong.truncate(3);
    assert!(
        ok,
        "records not pointing exactly where the user is, e.g. {wrong:?}; {:?} {:?}",
        m1.snapshot(),
        m2.snapshot()
    );
    assert!(m1.snapshot().reconnects >= 1 && m2.snapshot().reconnects >= 1);
    w1.shutdown().unwrap();
    w2.shutdown().unwrap();
}
