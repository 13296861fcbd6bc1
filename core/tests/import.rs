//! The home region's side of cross-region routing, against real brokers: each test starts two
//! tansu brokers (the region's and the global bus), a `redis-server` and the real `iris-core`
//! binary configured for two regions (`r1` here, `r2` elsewhere, a home table fixing who lives
//! where), produces `Route` frames on the global route topic as another region's edge would,
//! plays this region's edges with rdkafka consumers of their inboxes, reads the other region's
//! route topic, and reads `/metrics`.
//! Needs `tansu` on PATH or in ~/.cargo/bin and `redis-server` on PATH.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    admin_of, consumer_from_beginning, delivers, ids, read_frames, write_online, Core, Sender,
};
use iris_bus::kafka::{ensure_topics, KafkaConfig};
use iris_bus::topics::{deliver, edge_inbox, partition_of, route};
use iris_bus::{
    encode, Ack, BusFrame, Deliver, DrainChunk, DrainRequest, PrekeyFetch, PrekeyPut, Route, Routed,
};
use iris_core::store::MessageStore;
use iris_tests::services::{Proc, RedisServer, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// This region.
const HERE: &str = "r1";
/// The other region.
const THERE: &str = "r2";
const PARTITIONS: u32 = 4;

/// Homed here: alice, carol, dave. Homed there: bob, erin.
const HOME_TABLE: &str = "# user region\nalice r1\ncarol r1\ndave r1\nbob r2\nerin r2\n";

/// A regional broker, a global broker, a Redis and a data directory for one test.
struct Env {
    regional: Tansu,
    global: Tansu,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("homes.txt"), HOME_TABLE).unwrap();
        Env {
            regional: Tansu::memory(),
            global: Tansu::memory(),
            redis: RedisServer::start(),
            dir,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts `iris-core` (member 0/1) for region r1 of r1,r2 and waits for its ready line.
    fn core(&self) -> Core {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        for a in [
            "--brokers",
            &self.regional.brokers(),
            "--redis",
            &self.redis.url(),
            "--region",
            HERE,
            "--partitions",
            &PARTITIONS.to_string(),
            "--regions",
            &format!("{HERE},{THERE}"),
            "--global-brokers",
            &self.global.brokers(),
            "--home-table",
        ] {
            args.push(a.into());
        }
        args.push(self.dir.path().join("homes.txt").into());
        args.extend(["--admin".into(), "127.0.0.1:0".into(), "--data-dir".into()]);
        args.push(self.data_dir().into());
        let (child, line) = common::spawn_core(args, Duration::from_secs(60));
        let admin = admin_of(&line);
        assert!(line.starts_with("iris-core ready region=r1 "), "{line}");
        Core {
            proc: Proc(Some(child)),
            admin,
            missing_is_zero: true,
            terminate_within: Duration::from_secs(20),
        }
    }

    fn kafka(&self, brokers: String) -> KafkaConfig {
        KafkaConfig {
            brokers,
            client_id: "test".to_owned(),
            ..KafkaConfig::default()
        }
    }

    /// A reader of edge `node`'s inbox in this region (topic created).
    fn edge(&self, node: u32) -> Reader {
        let topic = edge_inbox(HERE, node);
        ensure_topics(&self.kafka(self.regional.brokers()), &[(topic.clone(), 1)]).unwrap();
        Reader::new(&self.regional.brokers(), &[(topic, 0)])
    }

    /// A reader of the other region's route topic on the global bus (every partition).
    fn there(&self) -> Reader {
        let topic = route(THERE);
        ensure_topics(
            &self.kafka(self.global.brokers()),
            &[(topic.clone(), PARTITIONS as i32)],
        )
        .unwrap();
        let parts: Vec<(String, i32)> =
            (0..PARTITIONS as i32).map(|p| (topic.clone(), p)).collect();
        Reader::new(&self.global.brokers(), &parts)
    }

    fn regional_producer(&self) -> Sender {
        Sender::new(&self.regional.brokers())
    }

    fn global_producer(&self) -> Sender {
        Sender::new(&self.global.brokers())
    }

    /// Writes an online session for `user` on this region's edge `node` (the writer's layout).
    fn online(&self, user: &[u8], node: u32) {
        write_online(&self.redis.url(), HERE, user, node);
    }

    /// The offset the importer's group committed on route(r1) partition `p` (None: none).
    fn import_committed(&self, p: i32) -> Option<i64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.global.brokers())
            .set("group.id", format!("iris-import-{HERE}"))
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&route(HERE), p);
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        match got.elements().first()?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    fn signal_regional(&self, sig: &str) {
        let pid = self.regional.pid().expect("regional broker running");
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- regional broker log ---\n{}", self.regional.log());
            eprintln!("--- global broker log ---\n{}", self.global.log());
        }
    }
}

impl Sender {
    /// A frame on this region's deliver topic, as a local edge sends it.
    fn regional(&self, frame: &BusFrame) {
        let user = frame.key_user();
        let p = partition_of(user, PARTITIONS) as i32;
        self.raw_to(&deliver(HERE), p, user, &encode(frame).unwrap());
    }

    /// `Route{region, inner}` on `route(topic_region)`, as another region's edge or core
    /// sends it.
    fn routed(&self, topic_region: &str, region: &str, inner: BusFrame) {
        let frame = inner.route_to(region).unwrap();
        let user = frame.key_user().to_vec();
        let p = partition_of(&user, PARTITIONS) as i32;
        self.raw_to(&route(topic_region), p, &user, &encode(&frame).unwrap());
    }

    fn flush(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(30)) {
            panic!("flush failed: {e}");
        }
    }
}

/// Reads topic partitions from their beginning.
struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    fn new(brokers: &str, parts: &[(String, i32)]) -> Reader {
        Reader {
            consumer: consumer_from_beginning(brokers, "test-reader", &[], parts),
        }
    }

    /// Frames until `want` of them arrived or `timeout` passed.
    fn frames(&self, want: usize, timeout: Duration) -> Vec<BusFrame> {
        read_frames(&self.consumer, want, timeout)
    }

    /// The first frame `pick` accepts within 30 s (others skipped).
    fn first<T>(&self, what: &str, mut pick: impl FnMut(BusFrame) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for f in self.frames(1, Duration::from_millis(200)) {
                if let Some(t) = pick(f) {
                    return t;
                }
            }
        }
        panic!("no {what} within 30 s");
    }
}

fn msg(id: u64, to: &[u8], origin: &str) -> Deliver {
    Deliver {
        id,
        recipient: to.to_vec(),
        sender: b"bob".to_vec(),
        payload: format!("hello {id}").into_bytes(),
        origin: origin.to_owned(),
        kind: 0,
        confirm: None,
    }
}

fn drain_req(user: &[u8], node: u32, conn: u64, region: &str) -> BusFrame {
    BusFrame::DrainRequest(DrainRequest {
        user: user.to_vec(),
        node,
        shard: 0,
        conn,
        after: 0,
        limit: 100,
        region: region.to_owned(),
    })
}

/// Reads `parts` from offset 0 for 8 s: how many records, and where the delivers whose ids are
/// in `place` are (partition, offset, their place in the stream). Reports offset jumps.
fn find_delivers(
    brokers: &str,
    parts: &[(String, i32)],
    place: &HashMap<u64, usize>,
) -> (usize, Vec<(i32, i64, usize)>) {
    use rdkafka::message::Message;
    let c = consumer_from_beginning(brokers, "test-reader-where", &[], parts);
    let (mut n, mut found) = (0usize, Vec::new());
    let mut next: HashMap<i32, i64> = HashMap::new();
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        let Some(r) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = r.unwrap();
        n += 1;
        let (p, off) = (m.partition(), m.offset());
        let expected = next.insert(p, off + 1).unwrap_or(0);
        if off != expected {
            eprintln!("{}/{p}: offsets jump from {expected} to {off}", m.topic());
        }
        let Ok(f) = iris_bus::decode(m.payload().unwrap()).and_then(iris_bus::to_owned) else {
            continue;
        };
        let d = match f {
            BusFrame::Deliver(d) => d,
            BusFrame::Route(Route {
                inner: Routed::Deliver(d),
                ..
            }) => d,
            _ => continue,
        };
        if let Some(&at) = place.get(&d.id) {
            found.push((p, off, at));
        }
    }
    (n, found)
}

fn store_count(env: &Env, user: &[u8]) -> usize {
    MessageStore::open(env.data_dir())
        .unwrap()
        .count(user)
        .unwrap()
}

/// An id minted "now" by region `index`'s node 1, shard 0 (the edge's layout).
fn id_now(index: u64, seq: u64) -> u64 {
    let micros = iris_bus::hops::unix_micros() - iris_bus::hops::ID_EPOCH_MICROS;
    ((micros / 16) << 18) | (index << 14) | (1 << 6) | (seq & 63)
}

#[test]
fn routed_deliver_is_stored_at_home_routed_to_the_edge_and_stored_goes_back() {
    let env = Env::start();
    env.online(b"alice", 1);
    let edge = env.edge(1);
    let there = env.there();
    let core = env.core();
    let tx = env.global_producer();
    let id = id_now(1, 1);
    let d = msg(id, b"alice", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(d.clone()));
    tx.flush();
    let got = edge.frames(1, Duration::from_secs(30));
    assert_eq!(
        delivers(&got),
        vec![d.clone()],
        "routed live to alice's edge"
    );
    // The origin learns its message is stored at home.
    let stored = there.first("stored notice on route(r2)", |f| match f {
        BusFrame::Route(r) => match r.inner {
            Routed::Stored(s) if r.region == THERE => Some(s),
            _ => None,
        },
        _ => None,
    });
    assert_eq!(
        (stored.sender.as_slice(), stored.id, stored.home.as_str()),
        (b"bob".as_slice(), id, HERE)
    );
    core.wait_metric(r#"iris_core_imported_total{region="r2"}"#, 1);
    core.wait_metric(r#"iris_core_hop_seconds_count{hop="imported"}"#, 1);
    core.wait_metric("iris_core_delivers_total", 1);
    // Stored at home: a local login drains it.
    let rx = env.regional_producer();
    rx.regional(&drain_req(b"alice", 1, 5, ""));
    rx.flush();
    let chunk = edge.first("drain chunk", |f| match f {
        BusFrame::DrainChunk(c) if c.conn == 5 => Some(c),
        _ => None,
    });
    assert_eq!(ids(&chunk), vec![id]);
    // Acked, then the same routed record comes again (a retried produce, a re-import): it is
    // remembered as acked, counted as a duplicate, not stored again.
    rx.regional(&BusFrame::Ack(Ack {
        user: b"alice".to_vec(),
        id,
    }));
    rx.flush();
    core.wait_metric("iris_core_acks_total", 1);
    tx.routed(HERE, HERE, BusFrame::Deliver(d));
    tx.flush();
    core.wait_metric("iris_core_duplicates_total", 1);
    core.wait_metric(r#"iris_core_imported_total{region="r2"}"#, 2);
    assert_eq!(core.metric("iris_core_delivers_total"), 1);
    rx.regional(&drain_req(b"alice", 1, 6, ""));
    rx.flush();
    let chunk = edge.first("second drain chunk", |f| match f {
        BusFrame::DrainChunk(c) if c.conn == 6 => Some(c),
        _ => None,
    });
    assert!(chunk.messages.is_empty(), "acked: {chunk:?}");
    // Stored notices for this region's own messages feed the stored_at_home hop.
    tx.routed(
        HERE,
        HERE,
        BusFrame::Stored(iris_bus::Stored {
            sender: b"carol".to_vec(),
            id: id_now(0, 2),
            home: THERE.to_owned(),
        }),
    );
    tx.flush();
    core.wait_metric(r#"iris_core_hop_seconds_count{hop="stored_at_home"}"#, 1);
    core.wait_metric("iris_core_stored_seen_total", 1);
}

#[test]
fn global_offset_waits_for_the_regional_broker_and_a_restart_imports_again() {
    let env = Env::start();
    let mut core = env.core();
    let tx = env.global_producer();
    // A first record, imported and committed: the group has an offset.
    let first = msg(id_now(1, 1), b"alice", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(first));
    tx.flush();
    core.wait_metric("iris_core_delivers_total", 1);
    let p = partition_of(b"alice", PARTITIONS) as i32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.import_committed(p) != Some(1) {
        assert!(Instant::now() < deadline, "first import never committed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The regional broker stops answering: the next import is not acknowledged, so its global
    // offset is not committed.
    env.signal_regional("-STOP");
    let second = msg(id_now(1, 2), b"alice", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(second.clone()));
    tx.flush();
    let deadline = Instant::now() + Duration::from_secs(30);
    while core.metric(r#"iris_core_imported_total{region="r2"}"#) < 2 {
        assert!(Instant::now() < deadline, "second record not consumed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let body = core.metrics();
    let pending = core.metric("iris_core_import_pending");
    assert_eq!(pending, 1, "waiting for the ack:\n{body}");
    assert_eq!(
        env.import_committed(p),
        Some(1),
        "not committed past an unacknowledged import"
    );
    core.kill9();
    env.signal_regional("-CONT");
    // Restarted: the record is imported again and stored once.
    let core = env.core();
    core.wait_metric(r#"iris_core_imported_total{region="r2"}"#, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.import_committed(p) != Some(2) {
        assert!(Instant::now() < deadline, "re-import never committed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while core.metric("iris_core_delivers_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "re-import not consumed by the core"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let delivers = core.metric("iris_core_delivers_total");
    drop(core);
    assert_eq!(
        store_count(&env, b"alice"),
        2,
        "both messages stored, once each"
    );
    eprintln!("delivers handled after the restart: {delivers} (1 or 2: the stopped broker may have kept the first attempt)");
}

#[test]
fn foreign_drain_is_answered_across_and_a_roamer_gets_copies() {
    let env = Env::start();
    let core = env.core();
    let there = env.there();
    let rx = env.regional_producer();
    let stored: Vec<Deliver> = (1..=3).map(|i| msg(id_now(0, i), b"carol", HERE)).collect();
    for d in &stored {
        rx.regional(&BusFrame::Deliver(d.clone()));
    }
    rx.regional(&BusFrame::PrekeyPut(PrekeyPut {
        user: b"carol".to_vec(),
        bundle: b"keys".to_vec(),
    }));
    rx.flush();
    core.wait_metric("iris_core_delivers_total", 3);
    // carol logs in in r2: its edge's drain request and prekey fetch cross to her home.
    let tx = env.global_producer();
    tx.routed(HERE, HERE, drain_req(b"carol", 7, 42, THERE));
    tx.routed(
        HERE,
        HERE,
        BusFrame::PrekeyFetch(PrekeyFetch {
            user: b"carol".to_vec(),
            node: 7,
            shard: 0,
            conn: 43,
            region: THERE.to_owned(),
        }),
    );
    tx.flush();
    let chunk = there.first("drain chunk on route(r2)", |f| match f {
        BusFrame::Route(r) => match r.inner {
            Routed::DrainChunk(c) if r.region == THERE => Some(c),
            _ => None,
        },
        _ => None,
    });
    assert_eq!((chunk.node, chunk.conn), (7, 42));
    assert_eq!(ids(&chunk), stored.iter().map(|d| d.id).collect::<Vec<_>>());
    let bundle = there.first("prekey bundle on route(r2)", |f| match f {
        BusFrame::Route(r) => match r.inner {
            Routed::PrekeyBundle(b) if r.region == THERE => Some(b),
            _ => None,
        },
        _ => None,
    });
    assert_eq!((bundle.conn, bundle.bundle), (43, Some(b"keys".to_vec())));
    core.wait_metric("iris_core_roamers", 1);
    // A new message for carol, accepted here: stored, and copied live to her region.
    let live = msg(id_now(0, 9), b"carol", HERE);
    rx.regional(&BusFrame::Deliver(live.clone()));
    rx.flush();
    let copy = there.first("roamer copy on route(r2)", |f| match f {
        BusFrame::Route(r) => match r.inner {
            Routed::Deliver(d) if r.region == THERE => Some(d),
            _ => None,
        },
        _ => None,
    });
    // A visitor copy: the original origin behind the mark, so r2 routes it live only.
    assert_eq!(
        copy,
        Deliver {
            origin: format!("~{HERE}"),
            ..live
        }
    );
    core.wait_metric("iris_core_roamed_total", 1);
    core.wait_metric(r#"iris_core_routed_out_total{region="r2"}"#, 3);
    core.wait_metric("iris_core_delivers_total", 4);
    // A login here again ends the roaming: no more copies.
    rx.regional(&drain_req(b"carol", 1, 50, ""));
    rx.flush();
    core.wait_metric("iris_core_roamers", 0);
}

#[test]
fn visitor_copy_is_routed_live_and_never_stored() {
    let env = Env::start();
    env.online(b"bob", 1);
    let edge = env.edge(1);
    let core = env.core();
    let tx = env.global_producer();
    // bob (homed in r2) is logged in here; his home sends a live copy across (marked).
    let copy = msg(id_now(1, 1), b"bob", &format!("~{THERE}"));
    tx.routed(HERE, HERE, BusFrame::Deliver(copy.clone()));
    tx.flush();
    let got = edge.frames(1, Duration::from_secs(30));
    assert_eq!(delivers(&got), vec![copy]);
    core.wait_metric("iris_core_visitors_routed_total", 1);
    assert_eq!(core.metric("iris_core_delivers_total"), 0, "not stored");
    // erin (homed in r2) has no session here: dropped, counted.
    tx.routed(
        HERE,
        HERE,
        BusFrame::Deliver(msg(id_now(1, 2), b"erin", &format!("~{THERE}"))),
    );
    tx.flush();
    core.wait_metric("iris_core_visitor_dropped_total", 1);
    assert_eq!(core.metric("iris_core_forwarded_home_total"), 0);
    // SIGTERM stops the importer too (flush, final commit): exit 0, and both imports are
    // committed on the global bus.
    assert!(core.terminate().success(), "SIGTERM exits 0");
    for user in [&b"bob"[..], b"erin"] {
        let p = partition_of(user, PARTITIONS) as i32;
        assert!(
            env.import_committed(p).is_some_and(|o| o >= 1),
            "committed at shutdown"
        );
    }
    assert_eq!(store_count(&env, b"bob"), 0);
    assert_eq!(store_count(&env, b"erin"), 0);
}

#[test]
fn a_deliver_for_a_user_homed_elsewhere_without_the_mark_is_forwarded_home() {
    let env = Env::start();
    env.online(b"bob", 1);
    let edge = env.edge(1);
    let core = env.core();
    let there = env.there();
    // An edge of this region with an older home table (bob homed here) stored bob's message
    // on the regional deliver topic; another region's edge routed one here across.
    let rx = env.regional_producer();
    let local = msg(id_now(1, 1), b"bob", HERE);
    rx.regional(&BusFrame::Deliver(local.clone()));
    rx.flush();
    let tx = env.global_producer();
    let routed = msg(id_now(1, 2), b"bob", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(routed.clone()));
    tx.flush();
    // Both forwarded to bob's home (r2) unchanged, neither stored nor routed live here.
    let mut got = Vec::new();
    for what in ["first forwarded deliver", "second forwarded deliver"] {
        let seen = got.clone();
        got.push(there.first(what, |f| match f {
            BusFrame::Route(r) => match r.inner {
                Routed::Deliver(d) if r.region == THERE && !seen.contains(&d) => Some(d),
                _ => None,
            },
            _ => None,
        }));
    }
    got.sort_by_key(|d| d.id);
    assert_eq!(got, vec![local, routed]);
    core.wait_metric("iris_core_forwarded_home_total", 2);
    assert_eq!(core.metric("iris_core_delivers_total"), 0);
    assert_eq!(core.metric("iris_core_visitors_total"), 0);
    assert!(delivers(&edge.frames(1, Duration::from_secs(1))).is_empty());
    drop(core);
    assert_eq!(store_count(&env, b"bob"), 0);
}

#[test]
fn routes_for_another_region_are_counted_misrouted_and_skipped() {
    let env = Env::start();
    env.online(b"alice", 1);
    let edge = env.edge(1);
    let core = env.core();
    let tx = env.global_producer();
    tx.routed(
        HERE,
        THERE,
        BusFrame::Deliver(msg(id_now(1, 1), b"alice", THERE)),
    );
    tx.raw_to(&route(HERE), 0, b"x", b"\x03garbage");
    let good = msg(id_now(1, 2), b"alice", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(good.clone()));
    tx.flush();
    core.wait_metric("iris_core_import_misrouted_total", 1);
    core.wait_metric("iris_core_import_skipped_total", 1);
    let got = edge.frames(1, Duration::from_secs(30));
    assert_eq!(
        delivers(&got),
        vec![good],
        "only the record for this region"
    );
    assert!(edge.frames(1, Duration::from_secs(1)).is_empty());
    core.wait_metric("iris_core_delivers_total", 1);
}

#[test]
fn import_survives_a_kill_9_under_a_stream_of_2000_routed_messages() {
    const N: u64 = 2000;
    let env = Env::start();
    env.online(b"dave", 1);
    let edge = env.edge(1);
    let mut core = env.core();
    let tx = env.global_producer();
    let ids: Vec<u64> = (0..N).map(|i| id_now(1, i) + (i << 18)).collect();
    let want: HashSet<u64> = ids.iter().copied().collect();
    let producer = {
        let brokers = env.global.brokers();
        let ids = ids.clone();
        std::thread::spawn(move || {
            let tx = Sender::new(&brokers);
            for chunk in ids.chunks(10) {
                for &id in chunk {
                    tx.routed(HERE, HERE, BusFrame::Deliver(msg(id, b"dave", THERE)));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tx.flush();
            tx.failures()
        })
    };
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let record = |frames: Vec<BusFrame>, seen: &mut BTreeMap<u64, u32>| {
        for d in delivers(&frames) {
            *seen.entry(d.id).or_insert(0) += 1;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 300 {
        assert!(Instant::now() < deadline, "300 messages not routed in 60 s");
        record(edge.frames(50, Duration::from_millis(100)), &mut seen);
    }
    core.kill9();
    let at_kill = seen.len();
    let core = env.core();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < N as usize && Instant::now() < deadline {
        record(edge.frames(200, Duration::from_millis(200)), &mut seen);
    }
    let refused = producer.join().unwrap();
    assert!(
        refused.is_empty(),
        "the test's own produces failed: {refused:?}"
    );
    let missing: Vec<&u64> = want.iter().filter(|id| !seen.contains_key(id)).collect();
    let dups: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "kill at {at_kill} routed, distinct {} of {N}, duplicates {dups}",
        seen.len()
    );
    if !missing.is_empty() {
        // What to look at when it fails: which messages (their place in the stream), what the
        // restarted core counted, and whether they were stored.
        let place: HashMap<u64, usize> = missing
            .iter()
            .map(|id| (**id, ids.iter().position(|i| i == *id).unwrap()))
            .collect();
        let mut at: Vec<usize> = place.values().copied().collect();
        at.sort_unstable();
        eprintln!("missing, by place in the stream: {at:?}");
        let body = core.metrics();
        for line in body
            .lines()
            .filter(|l| l.starts_with("iris_") && !l.contains("_bucket") && !l.ends_with(" 0"))
        {
            eprintln!("{line}");
        }
        // Where are they: the route topic (global), the deliver topic and the edge's inbox
        // (regional)? Fresh readers from offset 0.
        let all = |topic: String| (0..PARTITIONS as i32).map(move |p| (topic.clone(), p));
        for (brokers, parts) in [
            (env.global.brokers(), all(route(HERE)).collect::<Vec<_>>()),
            (env.regional.brokers(), all(deliver(HERE)).collect()),
            (env.regional.brokers(), vec![(edge_inbox(HERE, 1), 0)]),
        ] {
            let (n, found) = find_delivers(&brokers, &parts, &place);
            eprintln!(
                "{}: {n} records; missing found at (partition, offset, place): {found:?}",
                parts[0].0
            );
        }
        drop(core);
        let store = MessageStore::open(env.data_dir()).unwrap();
        let stored = missing
            .iter()
            .filter(|id| matches!(store.payload_len(b"dave", ***id), Ok(Some(_))))
            .count();
        panic!(
            "{} never reached the edge ({stored} of them stored)",
            missing.len()
        );
    }
    assert_eq!(seen.len(), N as usize);
    assert!(
        dups < N as u32 / 2,
        "duplicates bounded by the records in flight at the kill: {dups}"
    );
    let _ = tx;
    core.wait_metric("iris_core_import_pending", 0);
    drop(core);
    assert_eq!(
        store_count(&env, b"dave"),
        N as usize,
        "every message stored once"
    );
}

#[test]
fn a_down_global_bus_does_not_stop_the_region_and_import_starts_when_it_returns() {
    let mut env = Env::start();
    env.online(b"alice", 1);
    let edge = env.edge(1);
    env.global.kill();
    let core = env.core();
    // The region works without the global bus.
    let rx = env.regional_producer();
    let local = msg(id_now(0, 1), b"alice", HERE);
    rx.regional(&BusFrame::Deliver(local.clone()));
    rx.flush();
    assert_eq!(
        delivers(&edge.frames(1, Duration::from_secs(30))),
        vec![local]
    );
    // The global bus comes back: the importer connects and imports.
    env.global.restart();
    let tx = env.global_producer();
    let d = msg(id_now(1, 2), b"alice", THERE);
    let deadline = Instant::now() + Duration::from_secs(60);
    while core.metric(r#"iris_core_imported_total{region="r2"}"#) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing imported after the global bus returned"
        );
        // The route topic exists once the importer connected.
        if ensure_topics(
            &env.kafka(env.global.brokers()),
            &[(route(HERE), PARTITIONS as i32)],
        )
        .is_ok()
        {
            tx.routed(HERE, HERE, BusFrame::Deliver(d.clone()));
            tx.flush();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let got = delivers(&edge.frames(1, Duration::from_secs(30)));
    assert_eq!(got.first(), Some(&d));
}

#[test]
fn answers_for_a_visitor_reach_its_edge_and_a_routed_ack_deletes_at_home() {
    let env = Env::start();
    let edge = env.edge(3);
    let core = env.core();
    let tx = env.global_producer();
    // bob (homed in r2) logged in on edge 3 here: his home's drain chunk and prekey bundle
    // cross back and go to edge 3's inbox.
    let chunk = DrainChunk {
        user: b"bob".to_vec(),
        node: 3,
        shard: 1,
        conn: 77,
        messages: vec![iris_bus::Drained {
            id: id_now(1, 1),
            sender: b"erin".to_vec(),
            payload: b"stored at home".to_vec(),
            kind: 0,
        }],
        more: false,
    };
    tx.routed(HERE, HERE, BusFrame::DrainChunk(chunk.clone()));
    let bundle = iris_bus::PrekeyBundle {
        user: b"erin".to_vec(),
        node: 3,
        shard: 0,
        conn: 78,
        bundle: Some(b"erin keys".to_vec()),
    };
    tx.routed(HERE, HERE, BusFrame::PrekeyBundle(bundle.clone()));
    tx.flush();
    let got = edge.frames(2, Duration::from_secs(30));
    assert!(got.contains(&BusFrame::DrainChunk(chunk)), "{got:?}");
    assert!(got.contains(&BusFrame::PrekeyBundle(bundle)), "{got:?}");
    core.wait_metric(r#"iris_core_imported_total{region="r2"}"#, 2);
    // alice (homed here) acks from another region: the routed ack deletes the stored message.
    let rx = env.regional_producer();
    let id = id_now(0, 5);
    rx.regional(&BusFrame::Deliver(msg(id, b"alice", HERE)));
    rx.flush();
    core.wait_metric("iris_core_delivers_total", 1);
    tx.routed(
        HERE,
        HERE,
        BusFrame::Ack(Ack {
            user: b"alice".to_vec(),
            id,
        }),
    );
    tx.flush();
    core.wait_metric("iris_core_acks_total", 1);
    core.wait_metric(r#"iris_core_imported_total{region=""}"#, 1);
    rx.regional(&drain_req(b"alice", 3, 80, ""));
    rx.flush();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        assert!(Instant::now() < deadline, "no drain chunk for conn 80");
        if let Some(c) = edge
            .frames(1, Duration::from_millis(200))
            .into_iter()
            .find_map(|f| match f {
                BusFrame::DrainChunk(c) if c.conn == 80 => Some(c),
                _ => None,
            })
        {
            break c;
        }
    };
    assert!(answer.messages.is_empty(), "deleted by the routed ack");
}

/// A global broker with memory storage restarted loses the route topic and the importer's
/// committed offsets. The importer's keeper re-creates the topic; its consumer cannot follow
/// the new log in place, so the core exits with status 75 (or librdkafka crashes it first) and
/// the test, playing the supervisor, restarts it: routes sent after the restart are imported.
#[test]
fn a_memory_global_broker_restart_is_recovered_from_by_the_importer() {
    let mut env = Env::start();
    env.online(b"alice", 1);
    let edge = env.edge(1);
    let mut core = env.core();
    let tx = env.global_producer();
    let before = msg(id_now(1, 1), b"alice", THERE);
    tx.routed(HERE, HERE, BusFrame::Deliver(before.clone()));
    tx.flush();
    assert_eq!(
        delivers(&edge.frames(1, Duration::from_secs(30))),
        vec![before]
    );
    drop(tx);
    let restarted = Instant::now();
    env.global.restart();
    let mut restarts = 0;
    // Routes sent until one is imported; the core restarted whenever it asks.
    let tx = env.global_producer();
    let mut sent = Vec::new();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while got.is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing imported within 90 s of the global broker's restart (core restarts: \
             {restarts}); the core's metrics:\n{}",
            core.metrics()
        );
        if core.exited_for_a_restart() {
            restarts += 1;
            drop(core);
            core = env.core();
        }
        // Sent only once the route topic exists again with its partitions (the importer's
        // keeper re-creates it): a produce to a missing topic would create nothing.
        if topic_partitions(&env.global.brokers(), &route(HERE)) == PARTITIONS as usize {
            let d = msg(id_now(1, 10 + sent.len() as u64), b"alice", THERE);
            tx.routed(HERE, HERE, BusFrame::Deliver(d.clone()));
            tx.flush();
            sent.push(d);
        }
        got = delivers(&edge.frames(1, Duration::from_secs(1)));
    }
    assert!(sent.contains(&got[0]), "{got:?} not among {sent:?}");
    eprintln!(
        "global broker restart recovered in {} ms; core restarts: {restarts}",
        restarted.elapsed().as_millis()
    );
}

/// Partitions of `topic` on `brokers` (0 when it does not exist).
fn topic_partitions(brokers: &str, topic: &str) -> usize {
    let admin: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("log_level", "3")
        .create()
        .unwrap();
    admin
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()
        .and_then(|md| {
            md.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
        })
        .unwrap_or(0)
}
