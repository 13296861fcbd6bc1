//! Session store against a real `redis-server`: each test starts its own server on a free
//! loopback port (no persistence) and stops it on drop.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use iris_core::sessions::{
    session_key, SessionConfig, SessionOp, SessionReader, SessionRecord, SessionWriter,
};
use iris_tests::services::RedisServer;

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

fn online(user: &[u8], node: &str, shard: u16) -> SessionOp {
    SessionOp::Online {
        user: user.to_vec(),
        node: node.to_owned(),
        shard,
        region: "eu-west".to_owned(),
    }
}

fn offline(user: &[u8], node: &str, last_seen: u64) -> SessionOp {
    SessionOp::Offline {
        user: user.to_vec(),
        node: node.to_owned(),
        region: "eu-west".to_owned(),
        last_seen,
    }
}

fn hgetall(c: &mut redis::Connection, user: &[u8]) -> std::collections::HashMap<String, String> {
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

#[test]
fn online_writes_hash_and_ttl() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    sinks[0].try_send(online(b"alice", "edge-1", 3)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 1));
    let mut c = srv.conn();
    let h = hgetall(&mut c, b"alice");
    assert_eq!(h["node"], "edge-1");
    assert_eq!(h["shard"], "3");
    assert_eq!(h["region"], "eu-west");
    assert_eq!(h["last_seen"], "0");
    assert_eq!(h["online"], "1");
    let t = ttl(&mut c, b"alice");
    assert!((86_390..=86_400).contains(&t), "ttl {t}");

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
fn offline_sets_last_seen() {
    let srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 2).unwrap();
    sinks[0].try_send(online(b"bob", "edge-2", 1)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 1));
    sinks[1]
        .try_send(offline(b"bob", "edge-2", 1_700_000_000))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    let mut c = srv.conn();
    let h = hgetall(&mut c, b"bob");
    assert_eq!(h["online"], "0");
    assert_eq!(h["last_seen"], "1700000000");
    assert_eq!(h["node"], "edge-2", "location kept");
    assert!(ttl(&mut c, b"bob") > 86_000);

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(
        reader.get(b"bob").unwrap(),
        Some(SessionRecord {
            node: "edge-2".into(),
            shard: 1,
            region: "eu-west".into(),
            last_seen: 1_700_000_000,
            online: false,
        })
    );
    writer.shutdown().unwrap();
}

#[test]
fn coalesces_per_user_latest_wins() {
    let srv = RedisServer::start();
    let c = SessionConfig {
        flush_interval_ms: 100,
        ..cfg(srv.url())
    };
    let (writer, sinks) = SessionWriter::start(c, 1).unwrap();
    for i in 0..1000u32 {
        let user = format!("user{}", i % 10);
        let op = match i % 3 {
            0 => online(user.as_bytes(), &format!("edge-{i}"), (i % 7) as u16),
            1 => SessionOp::Refresh {
                user: user.into_bytes(),
            },
            // From the node of the user's latest online (i - 20), or none yet.
            _ => offline(
                user.as_bytes(),
                &i.checked_sub(20)
                    .map_or_else(|| "edge-none".to_owned(), |j| format!("edge-{j}")),
                u64::from(i),
            ),
        };
        sinks[0].try_send(op).unwrap();
    }
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().pending_users == 0
        && m.snapshot().ops_in == 1000));
    writer.shutdown().unwrap();
    let s = m.snapshot();
    assert_eq!(s.ops_in, 1000);
    assert!(s.writes >= 10 && s.writes <= 30, "writes {}", s.writes);
    assert!(s.pipelines <= 3, "pipelines {}", s.pipelines);
    assert_eq!(s.errors, 0);

    let mut conn = srv.conn();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("session:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 10);
    // Latest op per user: i in 990..1000 → user i%10; expected state from that last i.
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    for i in 990..1000u32 {
        let user = format!("user{}", i % 10);
        let rec = reader.get(user.as_bytes()).unwrap().unwrap();
        match i % 3 {
            0 | 1 => {
                // A refresh folds into the state before: the user's previous op (i - 10,
                // and (i - 10) % 3 == 0 when i % 3 == 1) was an Online.
                let j = if i % 3 == 0 { i } else { i - 10 };
                assert!(rec.online, "{user}");
                assert_eq!(rec.node, format!("edge-{j}"));
                assert_eq!(rec.last_seen, 0);
            }
            _ => {
                assert!(!rec.online, "{user}");
                assert_eq!(rec.last_seen, u64::from(i));
            }
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
        let op = online(format!("u{i}").as_bytes(), "edge", 0);
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
            .try_send(online(format!("u{u}").as_bytes(), "edge-a", u))
            .unwrap();
    }
    assert!(wait_until(3, || m.snapshot().writes >= 20));

    srv.kill();
    // Ops keep coming while Redis is down: the latest state per user must survive.
    let mut expected = std::collections::HashMap::new();
    for round in 0..50u16 {
        for u in 0..20u16 {
            let user = format!("u{u}");
            let op = if (round + u) % 2 == 0 {
                online(user.as_bytes(), &format!("edge-{round}"), u)
            } else {
                // From the node of the user's online in the round before.
                let node = match round {
                    0 => "edge-a".to_owned(),
                    r => format!("edge-{}", r - 1),
                };
                offline(user.as_bytes(), &node, u64::from(round) + 1)
            };
            expected.insert(user, (round + u) % 2 == 0);
            // A queue may be momentarily full; retry (the writer drains it while down).
            let mut op = op;
            loop {
                match sinks[usize::from(u % 2)].try_send(op) {
                    Ok(()) => break,
                    Err(back) => {
                        op = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
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
        let want_online = expected[user];
        assert_eq!(rec.online, want_online, "{user}");
        let u: u16 = user[1..].parse().unwrap();
        if want_online {
            assert_eq!(rec.node, "edge-49");
            assert_eq!(rec.last_seen, 0);
        } else {
            assert_eq!(rec.last_seen, 50);
            assert_eq!(rec.shard, u, "location kept from the pending online");
        }
    }
    writer.shutdown().unwrap();
}

#[test]
fn reader_get_many_and_missing() {
    let mut srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    sinks[0].try_send(online(b"carol", "edge-9", 9)).unwrap();
    sinks[0].try_send(online(b"dave", "edge-8", 8)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    writer.shutdown().unwrap();

    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    assert_eq!(reader.get(b"nobody").unwrap(), None);
    let got = reader
        .get_many(&[&b"carol"[..], b"nobody", b"dave"])
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().unwrap().node, "edge-9");
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
        sinks[0].try_send(online(u, "edge-b", i as u16)).unwrap();
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
    sinks[0].try_send(online(b"on", "edge-r", 1)).unwrap();
    sinks[0].try_send(online(b"off", "edge-r", 2)).unwrap();
    sinks[0].try_send(offline(b"off", "edge-r", 5)).unwrap();
    let m = writer.metrics().clone();
    assert!(wait_until(3, || m.snapshot().pending_users == 0
        && m.snapshot().writes >= 2));
    let mut conn = srv.conn();
    for u in [&b"on"[..], b"off"] {
        redis::cmd("EXPIRE")
            .arg(session_key(u))
            .arg(100)
            .exec(&mut conn)
            .unwrap();
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
fn stale_offline_from_old_node_keeps_session_on_new_node() {
    let srv = RedisServer::start();
    // One writer per edge, as in a deployment.
    let (w1, s1) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (w2, s2) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let (m1, m2) = (w1.metrics().clone(), w2.metrics().clone());
    let user = b"mover";
    s1[0].try_send(online(user, "1", 4)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 1));
    // The user logs in on node 2 before its connection on node 1 is closed.
    s2[0].try_send(online(user, "2", 6)).unwrap();
    assert!(wait_until(3, || m2.snapshot().writes >= 1));
    let mut c = srv.conn();
    expire(&mut c, user, 100);

    // Node 1's last session ends: the record is node 2's and stays as it is, TTL included.
    s1[0].try_send(offline(user, "1", 1_700_000_100)).unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 2));
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let at_node2 = SessionRecord {
        node: "2".into(),
        shard: 6,
        region: "eu-west".into(),
        last_seen: 0,
        online: true,
    };
    assert_eq!(reader.get(user).unwrap(), Some(at_node2.clone()));
    let t = ttl(&mut c, user);
    assert!((0..=100).contains(&t), "ttl re-armed: {t}");

    // Same node id in another region is another node.
    s1[0]
        .try_send(SessionOp::Offline {
            user: user.to_vec(),
            node: "2".into(),
            region: "us-east".into(),
            last_seen: 1_700_000_150,
        })
        .unwrap();
    assert!(wait_until(3, || m1.snapshot().writes >= 3));
    assert_eq!(reader.get(user).unwrap(), Some(at_node2));

    // Node 2's last session ends: now the user is offline, at node 2.
    s2[0].try_send(offline(user, "2", 1_700_000_200)).unwrap();
    assert!(wait_until(3, || m2.snapshot().writes >= 2));
    assert_eq!(
        reader.get(user).unwrap(),
        Some(SessionRecord {
            node: "2".into(),
            shard: 6,
            region: "eu-west".into(),
            last_seen: 1_700_000_200,
            online: false,
        })
    );
    assert!(ttl(&mut c, user) > 86_000, "ttl re-armed by the offline");
    assert_eq!(m1.snapshot().errors + m2.snapshot().errors, 0);
    w1.shutdown().unwrap();
    w2.shutdown().unwrap();
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
    let offline_nowhere = |last_seen| SessionRecord {
        node: String::new(),
        shard: 0,
        region: String::new(),
        last_seen,
        online: false,
    };
    assert_eq!(
        reader.get(b"ghost").unwrap(),
        Some(offline_nowhere(1_700_000_300))
    );
    let mut c = srv.conn();
    assert!(ttl(&mut c, b"ghost") > 86_000);

    // A record without a node is anyone's to mark offline.
    sinks[0]
        .try_send(offline(b"ghost", "7", 1_700_000_400))
        .unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 2));
    assert_eq!(
        reader.get(b"ghost").unwrap(),
        Some(offline_nowhere(1_700_000_400))
    );
    assert_eq!(m.snapshot().errors, 0);
    writer.shutdown().unwrap();
}

#[test]
fn online_then_offline_in_one_batch_ends_offline() {
    let srv = RedisServer::start();
    // Another node held "moved" before it logged in and out on node 1.
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

    // As if written one by one: the online takes the record, the offline (of the same node)
    // then marks it offline.
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    for (user, shard) in [(&b"fresh"[..], 3u16), (b"moved", 5)] {
        assert_eq!(
            reader.get(user).unwrap(),
            Some(SessionRecord {
                node: "1".into(),
                shard,
                region: "eu-west".into(),
                last_seen: 1_700_000_500,
                online: false,
            }),
            "{}",
            String::from_utf8_lossy(user)
        );
    }
    let mut conn = srv.conn();
    assert!(ttl(&mut conn, b"moved") > 86_000);
    writer.shutdown().unwrap();
}

#[test]
fn conditional_offline_after_redis_restart() {
    let mut srv = RedisServer::start();
    let (writer, sinks) = SessionWriter::start(cfg(srv.url()), 1).unwrap();
    let m = writer.metrics().clone();
    // The first conditional offline teaches the writer the script's SHA1.
    sinks[0].try_send(offline(b"erin", "1", 10)).unwrap();
    assert!(wait_until(3, || m.snapshot().writes >= 1));

    // A fresh server has no scripts: the next pipeline must load it again.
    srv.restart();
    let mut c = srv.conn();
    redis::cmd("HSET")
        .arg(session_key(b"erin"))
        .arg("node")
        .arg("1")
        .arg("shard")
        .arg(2)
        .arg("region")
        .arg("eu-west")
        .arg("last_seen")
        .arg(0)
        .arg("online")
        .arg(1)
        .exec(&mut c)
        .unwrap();
    sinks[0].try_send(offline(b"erin", "1", 20)).unwrap();
    assert!(
        wait_until(4, || m.snapshot().writes >= 2),
        "{:?}",
        m.snapshot()
    );
    let h = hgetall(&mut c, b"erin");
    assert_eq!((h["online"].as_str(), h["last_seen"].as_str()), ("0", "20"));
    assert_eq!(h["shard"], "2", "location kept");
    // The old connection died with the server: the writer reconnected (and a `NOSCRIPT` would
    // have left the record online above).
    assert!(m.snapshot().reconnects >= 1, "{:?}", m.snapshot());
    writer.shutdown().unwrap();
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

/// The users that are not exactly `want` (with `None` for no record), in one pipelined lookup.
fn mismatches(
    reader: &SessionReader,
    want: &[(Vec<u8>, Option<SessionRecord>)],
) -> Vec<(String, Option<SessionRecord>)> {
    let users: Vec<&[u8]> = want.iter().map(|(u, _)| u.as_slice()).collect();
    let Ok(got) = reader.get_many(&users) else {
        return vec![("<redis unreachable>".to_owned(), None)];
    };
    want.iter()
        .zip(got)
        .filter(|((_, w), g)| w != g)
        .map(|((u, _), g)| (String::from_utf8_lossy(u).into_owned(), g))
        .collect()
}

fn online_record(node: &str, shard: u16, region: &str) -> Option<SessionRecord> {
    Some(SessionRecord {
        node: node.to_owned(),
        shard,
        region: region.to_owned(),
        last_seen: 0,
        online: true,
    })
}

fn dbsize(c: &mut redis::Connection) -> u64 {
    redis::cmd("DBSIZE").query(c).unwrap()
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
        // A few users at another location (one writer normally serves one node and region).
        let (node, region) = if u % 1000 == 0 {
            ("edge-x", "us-east")
        } else {
            ("edge-r", "eu-west")
        };
        let shard = u % 16;
        send(
            &sinks[usize::from(u % 2)],
            SessionOp::Online {
                user: user.clone(),
                node: node.to_owned(),
                shard,
                region: region.to_owned(),
            },
        );
        want.push((user, online_record(node, shard, region)));
    }
    // A user who moved shard: the latest location is the one restored. (One queue: the order
    // between two producers' queues is not defined.)
    send(&sinks[0], online(b"mover", "edge-r", 1));
    send(&sinks[0], online(b"mover", "edge-r", 2));
    want.push((b"mover".to_vec(), online_record("edge-r", 2, "eu-west")));
    // A user who logged out before the restart: not resurrected.
    send(&sinks[0], online(b"gone", "edge-r", 3));
    let total = u64::from(N) + 3;
    assert!(wait_until(10, || m.snapshot().ops_in == total
        && m.snapshot().pending_users == 0));
    send(&sinks[0], offline(b"gone", "edge-r", 1_700_000_000));
    assert!(wait_until(10, || m.snapshot().ops_in == total + 1
        && m.snapshot().pending_users == 0));
    let mut conn = srv.conn();
    assert_eq!(dbsize(&mut conn), u64::from(N) + 2);
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
    assert_eq!(dbsize(&mut conn), u64::from(N) + 1);
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
        send(&sinks[0], online(u, "edge-r", shard));
    }
    assert!(wait_until(3, || m.snapshot().writes >= 3
        && m.snapshot().pending_users == 0));

    srv.kill();
    // While Redis is down: one user logs out, one moves shard, one logs in.
    send(&sinks[0], offline(b"leaves", "edge-r", 1_700_000_600));
    send(&sinks[0], online(b"moves", "edge-r", 7));
    send(&sinks[0], online(b"joins", "edge-r", 8));
    assert!(wait_until(3, || m.snapshot().pending_users == 3));

    // Back empty: the pending ops win over the resync of what was written before.
    srv.restart();
    let reader = SessionReader::new(&cfg(srv.url())).unwrap();
    let want = vec![
        (b"stays".to_vec(), online_record("edge-r", 1, "eu-west")),
        (b"moves".to_vec(), online_record("edge-r", 7, "eu-west")),
        (b"joins".to_vec(), online_record("edge-r", 8, "eu-west")),
        // The conditional offline found no record: offline, without a location.
        (
            b"leaves".to_vec(),
            Some(SessionRecord {
                node: String::new(),
                shard: 0,
                region: String::new(),
                last_seen: 1_700_000_600,
                online: false,
            }),
        ),
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
    send(&sinks[0], online(b"kept", "edge-d", 1));
    send(&sinks[0], online(b"deleted", "edge-d", 4));
    send(&sinks[0], online(b"off", "edge-d", 2));
    assert!(wait_until(3, || m.snapshot().ops_in == 3
        && m.snapshot().pending_users == 0));
    // Written after its online (not folded into it): the writer must forget the user.
    send(&sinks[0], offline(b"off", "edge-d", 1_700_000_700));
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
        (b"kept".to_vec(), online_record("edge-d", 1, "eu-west")),
        (b"deleted".to_vec(), online_record("edge-d", 4, "eu-west")),
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
