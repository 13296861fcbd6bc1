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
