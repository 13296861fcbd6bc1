//! The `iris-core` binary against a real broker and a real Redis: each test starts its own tansu
//! (memory storage) and `redis-server` on free loopback ports, runs the real `iris-core`
//! process(es) with an admin endpoint on `127.0.0.1:0`, plays the edges with plain rdkafka
//! clients, reads `/metrics`, and kills everything when done. Tests run in parallel.
//! Needs `tansu` on PATH or in ~/.cargo/bin and `redis-server` on PATH.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    consumer_from_beginning, delivers, ids, read_frames, sample, write_online, Core, Sender,
};
use iris_bus::kafka::{ensure_topics, KafkaConfig};
use iris_bus::topics::{deliver, edge_inbox, partition_of, presence};
use iris_bus::{
    encode, Ack, BusFrame, Deliver, DrainChunk, DrainRequest, EdgeReset, PrekeyBundle, PrekeyFetch,
    PrekeyPut, Presence, Relay, RelayKind,
};
use iris_core::store::MessageStore;
use iris_tests::services::{Proc, RedisServer, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;

const REGION: &str = "r1";
const PARTITIONS: u32 = 4;

/// A broker, a Redis and a data directory for one test.
struct Env {
    tansu: Tansu,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        Env {
            tansu: Tansu::memory(),
            redis: RedisServer::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn brokers(&self) -> String {
        self.tansu.brokers()
    }

    fn redis_url(&self) -> String {
        self.redis.url()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts the only member (0/1) on the default data directory.
    fn core(&self) -> Core {
        self.member(0, 1, &self.data_dir())
    }

    /// Starts member `member` of `members` on `data_dir`, with an admin endpoint on a free
    /// port, and waits for its ready line.
    fn member(&self, member: u32, members: u32, data_dir: &Path) -> Core {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        for a in [
            "--brokers",
            &self.brokers(),
            "--redis",
            &self.redis_url(),
            "--region",
            REGION,
            "--partitions",
            &PARTITIONS.to_string(),
            "--member",
            &member.to_string(),
            "--members",
            &members.to_string(),
            "--admin",
            "127.0.0.1:0",
            // The ids of these tests are small numbers, i.e. minted in 2024: no expiry.
            "--message-ttl-secs",
            "0",
            "--data-dir",
        ] {
            args.push(a.into());
        }
        args.push(data_dir.into());
        let (child, line) = common::spawn_core(args, Duration::from_secs(30));
        let line = line.trim().to_owned();
        let assigned: Vec<String> = (0..PARTITIONS)
            .filter(|p| p % members == member)
            .map(|p| p.to_string())
            .collect();
        let want = format!(
            "iris-core ready region={REGION} member={member}/{members} partitions={PARTITIONS} \
             assigned={} admin=127.0.0.1:",
            assigned.join(",")
        );
        let port = line
            .strip_prefix(&want)
            .unwrap_or_else(|| panic!("ready line {line:?}, expected {want:?}PORT"));
        let port: u16 = port.parse().expect("admin port");
        assert_ne!(port, 0, "the real admin port is printed");
        Core {
            proc: Proc(Some(child)),
            admin: format!("127.0.0.1:{port}"),
            missing_is_zero: false,
            terminate_within: Duration::from_secs(15),
        }
    }

    fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers(),
            client_id: "test".to_owned(),
            ..KafkaConfig::default()
        }
    }

    /// Creates the inbox topic of edge `node` and returns a reader of it (partition 0).
    fn edge(&self, node: u32) -> Edge {
        let topic = edge_inbox(REGION, node);
        ensure_topics(&self.kafka(), &[(topic.clone(), 1)]).unwrap();
        let consumer = consumer_from_beginning(
            &self.brokers(),
            &format!("test-edge-{node}"),
            &[],
            &[(topic, 0)],
        );
        Edge {
            consumer,
            seen: RefCell::new(Vec::new()),
        }
    }

    fn producer(&self) -> Sender {
        Sender::new(&self.brokers())
    }

    /// Writes an online session for `user` on edge `node` (raw Redis, the writer's layout).
    fn online(&self, user: &[u8], node: u32) {
        write_online(&self.redis_url(), REGION, user, node);
    }
}

impl Sender {
    fn raw(&self, user: &[u8], payload: &[u8]) {
        let p = partition_of(user, PARTITIONS) as i32;
        self.raw_to(&deliver(REGION), p, user, payload);
    }

    fn frame(&self, frame: &BusFrame) {
        self.raw(frame.key_user(), &encode(frame).unwrap());
    }

    /// Publishes `frame` on the presence topic as an edge does: a presence on its user's
    /// partition, an edge reset on every partition.
    fn presence(&self, frame: &BusFrame) {
        let topic = presence(REGION);
        let payload = encode(frame).unwrap();
        match frame {
            BusFrame::EdgeReset(_) => {
                for p in 0..PARTITIONS as i32 {
                    self.raw_to(&topic, p, b"", &payload);
                }
            }
            _ => {
                let user = frame.key_user();
                let p = partition_of(user, PARTITIONS) as i32;
                self.raw_to(&topic, p, user, &payload);
            }
        }
        self.flush();
    }

    fn flush(&self) {
        self.producer.flush(Duration::from_secs(10)).unwrap();
        let failed = self.failures();
        assert!(failed.is_empty(), "records not delivered: {failed:?}");
    }
}

/// Reads an edge inbox.
struct Edge {
    consumer: BaseConsumer,
    /// Frames read by [`Edge::until`] that did not match yet, in arrival order.
    seen: RefCell<Vec<BusFrame>>,
}

impl Edge {
    /// Frames until `want` of them arrived or `timeout` passed.
    fn frames(&self, want: usize, timeout: Duration) -> Vec<BusFrame> {
        read_frames(&self.consumer, want, timeout)
    }

    /// The first frame, among the ones not matched yet and then the new ones, that `pick`
    /// accepts (at most 30 s); returns it with the unmatched frames that arrived before it.
    /// Frames it does not accept stay for later calls.
    fn until<T>(
        &self,
        what: &str,
        mut pick: impl FnMut(&BusFrame) -> Option<T>,
    ) -> (T, Vec<BusFrame>) {
        let mut seen = self.seen.borrow_mut();
        if let Some((i, t)) = seen
            .iter()
            .enumerate()
            .find_map(|(i, f)| Some((i, pick(f)?)))
        {
            seen.remove(i);
            return (t, seen[..i].to_vec());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for f in self.frames(1, Duration::from_millis(200)) {
                if let Some(t) = pick(&f) {
                    return (t, seen.clone());
                }
                seen.push(f);
            }
        }
        panic!("no {what} within 30 s; frames seen: {seen:?}");
    }

    /// The first drain chunk for connection `conn` (other frames skipped).
    fn chunk(&self, conn: u64) -> DrainChunk {
        self.until(&format!("drain chunk for conn {conn}"), |f| match f {
            BusFrame::DrainChunk(c) if c.conn == conn => Some(c.clone()),
            _ => None,
        })
        .0
    }

    /// The first prekey bundle for connection `conn` (other frames skipped).
    fn bundle(&self, conn: u64) -> PrekeyBundle {
        self.until(&format!("prekey bundle for conn {conn}"), |f| match f {
            BusFrame::PrekeyBundle(b) if b.conn == conn => Some(b.clone()),
            _ => None,
        })
        .0
    }
}

fn msg(id: u64, to: &[u8]) -> Deliver {
    Deliver {
        id,
        recipient: to.to_vec(),
        sender: b"alice".to_vec(),
        payload: format!("hello {id}").into_bytes(),
        origin: REGION.to_owned(),
        // Every v2 kind, so that routes and drains are seen to keep it.
        kind: (id % 3) as u8,
        confirm: None,
    }
}

fn drain_after(user: &[u8], node: u32, conn: u64, after: u64, limit: u32) -> BusFrame {
    BusFrame::DrainRequest(DrainRequest {
        user: user.to_vec(),
        node,
        shard: 1,
        conn,
        after,
        limit,
        region: String::new(),
    })
}

fn drain(user: &[u8], node: u32, conn: u64, limit: u32) -> BusFrame {
    drain_after(user, node, conn, 0, limit)
}

fn relay(to: &[u8], kind: RelayKind, frame: &[u8]) -> Relay {
    Relay {
        recipient: to.to_vec(),
        kind,
        frame: frame.to_vec(),
    }
}

#[test]
fn deliver_to_online_user_is_routed_to_its_edge_and_sigterm_exits_0() {
    let env = Env::start();
    let edge = env.edge(7);
    env.online(b"bob", 7);
    let core = env.core();
    let tx = env.producer();
    let sent: Vec<Deliver> = (1..=5).map(|i| msg(i, b"bob")).collect();
    for d in &sent {
        tx.frame(&BusFrame::Deliver(d.clone()));
    }
    tx.flush();
    let got = edge.frames(5, Duration::from_secs(30));
    assert_eq!(delivers(&got), sent, "routed delivers, in order and equal");
    core.wait_metric("iris_core_routed_total", 5);
    assert_eq!(core.metric("iris_core_hinted_routes_total"), 0);
    assert!(core.terminate().success(), "exit 0 on SIGTERM");
}

#[test]
fn offline_message_is_kept_and_drained_in_order() {
    let env = Env::start();
    let edge = env.edge(3);
    let _core = env.core();
    let tx = env.producer();
    for i in 1..=100 {
        tx.frame(&BusFrame::Deliver(msg(i, b"carol")));
    }
    tx.frame(&drain(b"carol", 3, 1, 1000));
    tx.frame(&drain(b"carol", 3, 2, 40));
    tx.flush();
    let all = edge.chunk(1);
    assert_eq!(ids(&all), (1..=100).collect::<Vec<_>>());
    assert!(!all.more);
    assert_eq!(all.user, b"carol");
    assert_eq!(all.shard, 1);
    assert_eq!(all.messages[41].sender, b"alice");
    assert_eq!(all.messages[41].payload, b"hello 42");
    assert_eq!(
        all.messages.iter().map(|m| m.kind).collect::<Vec<_>>(),
        (1..=100u64).map(|i| (i % 3) as u8).collect::<Vec<_>>(),
        "each message drains with the kind it was stored with"
    );
    let part = edge.chunk(2);
    assert_eq!(ids(&part), (1..=40).collect::<Vec<_>>());
    assert!(part.more);
    // Nothing was routed: carol has no session, and her delivers came before her login hint.
    let rest = edge.frames(1, Duration::from_millis(500));
    assert!(
        rest.iter().all(|f| !matches!(f, BusFrame::Deliver(_))),
        "offline delivers must not be routed: {rest:?}"
    );
}

#[test]
fn ack_before_drain_removes_the_message() {
    let env = Env::start();
    let edge = env.edge(4);
    let core = env.core();
    let tx = env.producer();
    for i in 1..=10 {
        tx.frame(&BusFrame::Deliver(msg(i, b"dave")));
    }
    // Acks right behind the delivers (often the same commit window: the insert is cancelled).
    for id in [2, 5] {
        tx.frame(&BusFrame::Ack(Ack {
            user: b"dave".to_vec(),
            id,
        }));
    }
    tx.frame(&drain(b"dave", 4, 1, 100));
    tx.flush();
    assert_eq!(ids(&edge.chunk(1)), vec![1, 3, 4, 6, 7, 8, 9, 10]);
    // An ack well after the commit deletes the stored message.
    tx.frame(&BusFrame::Ack(Ack {
        user: b"dave".to_vec(),
        id: 9,
    }));
    tx.frame(&drain(b"dave", 4, 2, 100));
    tx.flush();
    assert_eq!(ids(&edge.chunk(2)), vec![1, 3, 4, 6, 7, 8, 10]);
    // Acks of ids not stored (never delivered, or deleted already) write no tombstone.
    for id in [9, 500, 501] {
        tx.frame(&BusFrame::Ack(Ack {
            user: b"dave".to_vec(),
            id,
        }));
    }
    tx.flush();
    core.wait_metric("iris_core_acks_not_stored_total", 3);
    tx.frame(&drain(b"dave", 4, 3, 100));
    tx.flush();
    assert_eq!(ids(&edge.chunk(3)), vec![1, 3, 4, 6, 7, 8, 10]);
}

#[test]
fn kill_9_loses_nothing_stored() {
    let env = Env::start();
    let edge = env.edge(5);
    let mut core = env.core();
    let tx = env.producer();
    for i in 1..=50 {
        tx.frame(&BusFrame::Deliver(msg(i, b"erin")));
    }
    tx.frame(&drain(b"erin", 5, 1, 1000));
    tx.flush();
    // The chunk is produced after its window was written: everything before it was consumed.
    assert_eq!(ids(&edge.chunk(1)), (1..=50).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(300));
    core.kill9();
    {
        let store = MessageStore::open(env.data_dir()).unwrap();
        assert_eq!(store.count(b"erin").unwrap(), 50, "stored before the kill");
    }
    let _core = env.core();
    tx.frame(&drain(b"erin", 5, 2, 1000));
    tx.flush();
    assert_eq!(ids(&edge.chunk(2)), (1..=50).collect::<Vec<_>>());
}

#[test]
fn restart_resumes_after_the_committed_offsets() {
    let env = Env::start();
    let edge = env.edge(5);
    let core = env.core();
    let tx = env.producer();
    for i in 1..=20 {
        tx.frame(&BusFrame::Deliver(msg(i, b"erin")));
    }
    tx.frame(&drain(b"erin", 5, 1, 1000));
    tx.flush();
    assert_eq!(ids(&edge.chunk(1)), (1..=20).collect::<Vec<_>>());
    core.wait_metric("iris_core_records_total", 21);
    assert!(core.terminate().success());
    // The restarted member starts at the committed offsets of its partitions: it consumes
    // only the new request, and still answers from what the first run stored.
    let core = env.core();
    tx.frame(&drain(b"erin", 5, 2, 1000));
    tx.flush();
    assert_eq!(ids(&edge.chunk(2)), (1..=20).collect::<Vec<_>>());
    core.wait_metric("iris_core_records_total", 1);
    assert_eq!(core.metric("iris_core_delivers_total"), 0);
}

#[test]
fn corrupted_records_are_skipped() {
    let env = Env::start();
    let edge = env.edge(6);
    env.online(b"frank", 6);
    let core = env.core();
    let tx = env.producer();
    // The current version byte followed by garbage: invalid; a byte of no version: unknown.
    let mut garbage = vec![iris_bus::VERSION];
    garbage.extend_from_slice(b"garbage that is no archive");
    tx.raw(b"frank", &garbage);
    tx.raw(b"frank", b"\x63unknown version");
    tx.raw(b"frank", b"");
    let good = msg(1, b"frank");
    tx.frame(&BusFrame::Deliver(good.clone()));
    tx.frame(&drain(b"frank", 6, 9, 10));
    tx.flush();
    let (chunk, before) = edge.until("drain chunk for conn 9", |f| match f {
        BusFrame::DrainChunk(c) if c.conn == 9 => Some(c.clone()),
        _ => None,
    });
    assert_eq!(ids(&chunk), vec![1]);
    // The deliver was routed too (frank is online), in the same window's outputs, before the
    // chunk.
    assert_eq!(delivers(&before), vec![good]);
    let frames = |outcome: &str| {
        core.metric(&format!(
            "iris_core_bus_frames_total{{outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(frames("ok"), 2);
    assert_eq!(frames("invalid"), 2);
    assert_eq!(frames("unknown_version"), 1);
    assert_eq!(core.metric("iris_core_records_total"), 5);
}

#[test]
fn relay_is_routed_to_the_online_edge_and_dropped_offline() {
    let env = Env::start();
    let edge = env.edge(7);
    env.online(b"bob", 7);
    let core = env.core();
    let tx = env.producer();
    let typing = relay(b"bob", RelayKind::TypingStart, b"\x72\x00\x05alice");
    let receipt = relay(
        b"bob",
        RelayKind::ReadReceipt,
        b"\x75\x00\x05alice0000000000000001",
    );
    tx.frame(&BusFrame::Relay(relay(
        b"nobody",
        RelayKind::TypingStop,
        b"\x72\x00\x01x",
    )));
    tx.frame(&BusFrame::Relay(typing.clone()));
    tx.frame(&BusFrame::Relay(receipt.clone()));
    tx.frame(&drain_after(b"bob", 7, 3, 0, 10));
    tx.flush();
    let (chunk, before) = edge.until("drain chunk for conn 3", |f| match f {
        BusFrame::DrainChunk(c) if c.conn == 3 => Some(c.clone()),
        _ => None,
    });
    let relays: Vec<Relay> = before
        .into_iter()
        .filter_map(|f| match f {
            BusFrame::Relay(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        relays,
        vec![typing, receipt],
        "routed in order, bytes unchanged"
    );
    assert!(
        chunk.messages.is_empty(),
        "relays are never stored: {chunk:?}"
    );
    core.wait_metric("iris_core_relays_total", 3);
    assert_eq!(core.metric("iris_core_relays_routed_total"), 2);
    assert_eq!(core.metric("iris_core_relays_dropped_total"), 1);
    assert_eq!(core.metric("iris_core_delivers_total"), 0);
    let store_dir = env.data_dir();
    assert!(core.terminate().success());
    let store = MessageStore::open(store_dir).unwrap();
    assert_eq!(store.count(b"bob").unwrap(), 0);
    assert_eq!(store.count(b"nobody").unwrap(), 0);
}

#[test]
fn prekey_put_then_fetch_answers_the_bundle_and_unknown_user_none() {
    let env = Env::start();
    let edge = env.edge(3);
    let core = env.core();
    let tx = env.producer();
    let put = |bundle: &[u8]| {
        BusFrame::PrekeyPut(PrekeyPut {
            user: b"alice".to_vec(),
            bundle: bundle.to_vec(),
        })
    };
    let fetch = |user: &[u8], conn: u64| {
        BusFrame::PrekeyFetch(PrekeyFetch {
            user: user.to_vec(),
            node: 3,
            shard: 2,
            conn,
            region: String::new(),
        })
    };
    // Back to back: each fetch sees the put consumed before it, even in the same window.
    tx.frame(&put(b"\xa1\x01\x02"));
    tx.frame(&fetch(b"alice", 11));
    tx.frame(&fetch(b"zed", 12));
    tx.frame(&put(b"\xa1\x01\x03"));
    tx.frame(&fetch(b"alice", 13));
    tx.flush();
    let first = edge.bundle(11);
    assert_eq!(
        first,
        PrekeyBundle {
            user: b"alice".to_vec(),
            node: 3,
            shard: 2,
            conn: 11,
            bundle: Some(b"\xa1\x01\x02".to_vec()),
        }
    );
    let unknown = edge.bundle(12);
    assert_eq!(unknown.user, b"zed");
    assert_eq!(unknown.bundle, None);
    assert_eq!(edge.bundle(13).bundle, Some(b"\xa1\x01\x03".to_vec()));
    core.wait_metric("iris_core_prekey_fetches_total", 3);
    assert_eq!(core.metric("iris_core_prekey_puts_total"), 2);
    // Durable: a restarted member answers with the latest bundle.
    assert!(core.terminate().success());
    let _core = env.core();
    tx.frame(&fetch(b"alice", 14));
    tx.flush();
    assert_eq!(edge.bundle(14).bundle, Some(b"\xa1\x01\x03".to_vec()));
}

#[test]
fn login_hint_routes_delivers_and_relays_before_the_session_exists() {
    let env = Env::start();
    let edge5 = env.edge(5);
    let edge6 = env.edge(6);
    let edge7 = env.edge(7);
    let core = env.core();
    let tx = env.producer();
    // hank: no session in Redis; his login on node 5 has sent its first drain request.
    tx.frame(&drain(b"hank", 5, 1, 100));
    let live = msg(1, b"hank");
    tx.frame(&BusFrame::Deliver(live.clone()));
    let typing = relay(b"hank", RelayKind::TypingStart, b"\x72\x00\x05alice");
    tx.frame(&BusFrame::Relay(typing.clone()));
    // ivan: only a follow-up drain request (after != 0) from node 6: no hint.
    tx.frame(&drain_after(b"ivan", 6, 2, 7, 100));
    tx.frame(&BusFrame::Deliver(msg(2, b"ivan")));
    // gina: session on node 7 and a hint for node 5: both get the deliver, once each.
    env.online(b"gina", 7);
    tx.frame(&drain(b"gina", 5, 3, 100));
    let both = msg(3, b"gina");
    tx.frame(&BusFrame::Deliver(both.clone()));
    // kim: session and hint on the same node 7: one copy.
    env.online(b"kim", 7);
    tx.frame(&drain(b"kim", 7, 4, 100));
    let once = msg(4, b"kim");
    tx.frame(&BusFrame::Deliver(once.clone()));
    tx.flush();

    core.wait_metric("iris_core_records_total", 9);
    core.wait_metric("iris_core_routed_total", 4);
    assert_eq!(core.metric("iris_core_relays_routed_total"), 1);
    assert_eq!(core.metric("iris_core_offline_total"), 1, "ivan's deliver");
    // hank's deliver and relay, and gina's copy for node 5.
    assert_eq!(core.metric("iris_core_hinted_routes_total"), 3);
    assert_eq!(core.metric("iris_core_login_hints"), 3);

    let mut on5 = edge5.frames(5, Duration::from_secs(30));
    on5.extend(edge5.frames(1, Duration::from_millis(500)));
    assert_eq!(on5.len(), 5, "two chunks, two delivers, one relay: {on5:?}");
    let hank_chunk = on5
        .iter()
        .position(|f| matches!(f, BusFrame::DrainChunk(c) if c.conn == 1 && c.messages.is_empty()))
        .expect("hank's chunk");
    let hank_live = on5
        .iter()
        .position(|f| f == &BusFrame::Deliver(live.clone()))
        .expect("hank's deliver");
    assert!(
        hank_chunk < hank_live,
        "drain answer before the live deliver: {on5:?}"
    );
    assert!(on5.contains(&BusFrame::Relay(typing)), "{on5:?}");
    let mut got = delivers(&on5);
    got.sort_by_key(|d| d.id);
    assert_eq!(got, vec![live, both.clone()]);

    let mut on6 = edge6.frames(1, Duration::from_secs(30));
    on6.extend(edge6.frames(1, Duration::from_millis(500)));
    assert_eq!(on6.len(), 1, "only ivan's chunk: {on6:?}");
    assert!(matches!(&on6[0], BusFrame::DrainChunk(c) if c.conn == 2));

    let mut on7 = edge7.frames(3, Duration::from_secs(30));
    on7.extend(edge7.frames(1, Duration::from_millis(500)));
    let mut got = delivers(&on7);
    got.sort_by_key(|d| d.id);
    assert_eq!(got, vec![both, once], "{on7:?}");
    assert_eq!(on7.len(), 3, "two delivers and kim's chunk: {on7:?}");
}

#[test]
fn two_members_each_handle_only_their_partitions() {
    // Users on each of the 4 partitions: bob 0, erin 1, carol 2, alice 3.
    let users: [&[u8]; 4] = [b"bob", b"erin", b"carol", b"alice"];
    for (p, u) in users.iter().enumerate() {
        assert_eq!(partition_of(u, PARTITIONS), p as u32);
    }
    let env = Env::start();
    let edge = env.edge(8);
    let dirs = [env.dir.path().join("m0"), env.dir.path().join("m1")];
    let m0 = env.member(0, 2, &dirs[0]);
    let m1 = env.member(1, 2, &dirs[1]);
    let tx = env.producer();
    for (p, u) in users.iter().enumerate() {
        for i in 1..=3 {
            tx.frame(&BusFrame::Deliver(msg(10 * p as u64 + i, u)));
        }
        tx.frame(&drain(u, 8, p as u64, 100));
    }
    tx.flush();
    for (p, u) in users.iter().enumerate() {
        let c = edge.chunk(p as u64);
        assert_eq!(c.user, *u);
        assert_eq!(
            ids(&c),
            (1..=3).map(|i| 10 * p as u64 + i).collect::<Vec<_>>()
        );
    }
    for m in [&m0, &m1] {
        m.wait_metric("iris_core_records_total", 8);
        assert_eq!(m.metric("iris_core_delivers_total"), 6);
        assert_eq!(m.metric("iris_core_drains_total"), 2);
        assert_eq!(m.metric("iris_core_assigned_partitions"), 2);
        assert_eq!(m.metric("iris_core_partitions"), 4);
    }
    assert!(m0.terminate().success());
    assert!(m1.terminate().success());
    for (m, dir) in dirs.iter().enumerate() {
        let store = MessageStore::open(dir).unwrap();
        for (p, u) in users.iter().enumerate() {
            let want = if p % 2 == m { 3 } else { 0 };
            assert_eq!(
                store.count(u).unwrap(),
                want,
                "member {m} store, user {} (partition {p})",
                String::from_utf8_lossy(u)
            );
        }
    }
}

#[test]
fn admin_serves_metrics_and_health() {
    let env = Env::start();
    let core = env.core();
    assert_eq!(core.get("/health"), (200, "ok\n".to_owned()));
    assert_eq!(core.get("/nope").0, 404);
    let tx = env.producer();
    tx.frame(&BusFrame::Deliver(msg(1, b"mia")));
    tx.flush();
    core.wait_metric("iris_core_delivers_total", 1);
    let (status, body) = core.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "records",
        "delivers",
        "acks",
        "cancelled",
        "drains",
        "relays",
        "prekey_puts",
        "prekey_fetches",
        "presence",
        "ignored",
        "rejected",
        "routed",
        "offline",
        "relays_routed",
        "relays_dropped",
        "hinted_routes",
        "hints_dropped",
        "commits",
        "session_errors",
    ] {
        let metric = format!("iris_core_{name}_total");
        assert!(
            sample(&body, &metric).is_some(),
            "{metric} missing:\n{body}"
        );
        assert!(
            body.contains(&format!("# TYPE {metric} counter\n")),
            "{metric} has no TYPE line"
        );
    }
    assert_eq!(sample(&body, "iris_core_offline_total"), Some(1));
    assert!(sample(&body, "iris_core_commits_total").unwrap() >= 1);
    assert_eq!(
        sample(&body, "iris_core_bus_frames_total{outcome=\"ok\"}"),
        Some(1)
    );
    for name in [
        "iris_core_login_hints",
        "iris_core_partitions",
        "iris_core_assigned_partitions",
        "iris_core_store_corrupt_skipped_total",
        "iris_core_producer_frames_in_total",
        "iris_core_producer_produced_ok_total",
        "iris_core_producer_in_flight",
    ] {
        assert!(sample(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert!(core.terminate().success());
}

/// Runs `iris-core` with unreachable services and `extra` flags; a refused flag makes it exit
/// before anything is started.
fn core_with_flags(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iris-core"))
        .args([
            "--brokers",
            "127.0.0.1:1",
            "--redis",
            "redis://127.0.0.1:1/",
        ])
        .args([
            "--region",
            REGION,
            "--data-dir",
            "/nonexistent/iris-core-test",
        ])
        .args(extra)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

#[test]
fn invalid_member_flags_are_refused() {
    for (member, members, why) in [("2", "2", "below --members"), ("0", "0", "at least 1")] {
        let out = core_with_flags(&["--member", member, "--members", members]);
        assert!(!out.status.success(), "member {member}/{members} accepted");
        assert!(out.stdout.is_empty(), "no ready line");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "stderr {err:?} lacks {why:?}");
    }
}

#[test]
fn zero_fetch_wait_is_refused() {
    let out = core_with_flags(&["--fetch-wait-max-ms", "0"]);
    assert!(!out.status.success(), "--fetch-wait-max-ms 0 accepted");
    assert!(out.stdout.is_empty(), "no ready line");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 1"), "stderr {err:?}");
}

/// A presence event of `user` on `node` stamped `unix_ms`.
fn presence_event(user: &[u8], node: u32, online: bool, unix_ms: u64) -> BusFrame {
    BusFrame::Presence(Presence {
        user: user.to_vec(),
        online,
        node,
        shard: 0,
        unix_ms,
    })
}

/// The delivers among the frames that arrive within `d`.
fn delivers_within(edge: &Edge, d: Duration) -> Vec<u64> {
    delivers(&edge.frames(usize::MAX, d))
        .iter()
        .map(|d| d.id)
        .collect()
}

/// Publishes `events` until the core has consumed them all: the core reads the presence topic
/// from its end as of its start, which it resolves asynchronously, so earlier events may be
/// skipped. Publishes the batch again until one is counted, then once more and waits for that
/// whole batch.
fn publish_presence(core: &Core, tx: &Sender, events: &[BusFrame]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in events {
            tx.presence(e);
        }
        std::thread::sleep(Duration::from_millis(300));
        if core.metric("iris_core_presence_total") > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no presence event consumed");
    }
    let before = core.metric("iris_core_presence_total");
    for e in events {
        tx.presence(e);
    }
    core.wait_metric("iris_core_presence_total", before + events.len() as u64);
}

#[test]
fn routed_copies_not_acked_at_a_kill_are_routed_again_after_restart() {
    let env = Env::start();
    // Node 9's inbox does not exist yet: the producer keeps retrying the routed copies, so
    // none is acknowledged by the broker.
    env.online(b"finn", 9);
    let mut core = env.core();
    let tx = env.producer();
    let sent: Vec<Deliver> = (1..=20).map(|i| msg(i, b"finn")).collect();
    for d in &sent {
        tx.frame(&BusFrame::Deliver(d.clone()));
    }
    tx.flush();
    core.wait_metric("iris_core_routed_total", 20);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(core.metric("iris_core_producer_produced_ok_total"), 0);
    assert!(
        core.metric("iris_core_commits_total") >= 1,
        "the windows were fsynced"
    );
    // The routed hop is measured at the broker's ack, the consumed hop at consumption.
    assert_eq!(
        core.metric(r#"iris_core_hop_seconds_count{hop="routed"}"#),
        0
    );
    assert_eq!(
        core.metric(r#"iris_core_hop_seconds_count{hop="consumed"}"#),
        20
    );
    core.kill9();
    {
        let store = MessageStore::open(env.data_dir()).unwrap();
        assert_eq!(store.count(b"finn").unwrap(), 20, "stored before the kill");
    }
    // The inbox appears; the restarted core consumes the records again (their offsets were
    // not committed: their routed copies were never acknowledged) and routes them.
    let edge = env.edge(9);
    let core = env.core();
    let got = edge.frames(20, Duration::from_secs(30));
    assert_eq!(
        delivers(&got),
        sent,
        "every routed copy, in order, without a login"
    );
    core.wait_metric("iris_core_delivers_total", 20);
    core.wait_metric("iris_core_producer_produced_ok_total", 20);
    core.wait_metric(r#"iris_core_hop_seconds_count{hop="routed"}"#, 20);
}

#[test]
fn drain_chunks_are_capped_by_bytes_and_a_large_message_goes_alone() {
    let env = Env::start();
    let edge = env.edge(3);
    let _core = env.core();
    let tx = env.producer();
    let big = |id: u64, len: usize| Deliver {
        payload: vec![(id % 251) as u8; len],
        ..msg(id, b"gwen")
    };
    for i in 1..=20 {
        tx.frame(&BusFrame::Deliver(big(i, 100_000)));
    }
    tx.frame(&BusFrame::Deliver(big(21, 900_000)));
    for i in 22..=24 {
        tx.frame(&BusFrame::Deliver(msg(i, b"gwen")));
    }
    tx.flush();
    let mut chunks: Vec<Vec<u64>> = Vec::new();
    let mut after = 0;
    for conn in 1.. {
        tx.frame(&drain_after(b"gwen", 3, conn, after, 1000));
        tx.flush();
        let c = edge.chunk(conn);
        let bytes: usize = c
            .messages
            .iter()
            .map(|m| m.payload.len() + m.sender.len())
            .sum();
        assert!(
            c.messages.len() == 1 || bytes <= 512 * 1024,
            "chunk of {bytes} bytes"
        );
        for m in &c.messages {
            let want = if m.id <= 21 {
                big(m.id, if m.id == 21 { 900_000 } else { 100_000 }).payload
            } else {
                format!("hello {}", m.id).into_bytes()
            };
            assert!(m.payload == want, "payload of {}", m.id);
        }
        chunks.push(ids(&c));
        after = *ids(&c).last().expect("a chunk with more has messages");
        if !c.more {
            break;
        }
        assert!(conn < 50, "too many chunks: {chunks:?}");
    }
    assert_eq!(
        chunks,
        vec![
            (1..=5).collect::<Vec<_>>(),
            (6..=10).collect(),
            (11..=15).collect(),
            (16..=20).collect(),
            vec![21],
            (22..=24).collect(),
        ]
    );
}

#[test]
fn presence_cache_routes_to_every_online_node_and_drops_a_reset_node() {
    let mut env = Env::start();
    let e7 = env.edge(7);
    let e8 = env.edge(8);
    let core = env.core();
    let tx = env.producer();
    // hana has no Redis session at all: only the presence events make her routable. kim has
    // a session on node 7 from before this core started and logs in on node 8 after.
    env.online(b"kim", 7);
    publish_presence(
        &core,
        &tx,
        &[
            presence_event(b"hana", 7, true, 1_000),
            presence_event(b"hana", 8, true, 1_000),
            presence_event(b"kim", 8, true, 1_000),
        ],
    );
    assert_eq!(core.metric("iris_core_cached_users"), 2);
    // kim's older session (Redis) joins the cached one: both devices get the message.
    tx.frame(&BusFrame::Deliver(msg(100, b"kim")));
    tx.flush();
    for (edge, what) in [
        (&e7, "kim on node 7 (Redis)"),
        (&e8, "kim on node 8 (cache)"),
    ] {
        let got: Vec<u64> = delivers(&edge.frames(1, Duration::from_secs(30)))
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(got, vec![100], "{what}");
    }
    core.wait_metric("iris_core_routed_total", 2);
    // Redis is not needed for a cached user.
    env.redis.kill();
    for i in 1..=5 {
        tx.frame(&BusFrame::Deliver(msg(i, b"hana")));
    }
    tx.flush();
    let want: Vec<u64> = (1..=5).collect();
    let got7: Vec<u64> = delivers(&e7.frames(5, Duration::from_secs(30)))
        .iter()
        .map(|d| d.id)
        .collect();
    let got8: Vec<u64> = delivers(&e8.frames(5, Duration::from_secs(30)))
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!((got7, got8), (want.clone(), want), "both devices live");
    core.wait_metric("iris_core_routed_total", 12);
    assert!(core.metric("iris_core_cache_hits_total") >= 6);
    assert_eq!(
        core.metric("iris_core_retry_held"),
        0,
        "cached routes are never held"
    );
    // Node 7 restarts: its sessions are gone.
    tx.presence(&BusFrame::EdgeReset(EdgeReset {
        node: 7,
        unix_ms: 2_000,
    }));
    core.wait_metric("iris_core_edge_resets_total", u64::from(PARTITIONS));
    // A late login event node 7 stamped before its restart is stale.
    let before = core.metric("iris_core_presence_total");
    tx.presence(&presence_event(b"hana", 7, true, 1_500));
    core.wait_metric("iris_core_presence_total", before + 1);
    for i in 6..=8 {
        tx.frame(&BusFrame::Deliver(msg(i, b"hana")));
    }
    tx.flush();
    let got8: Vec<u64> = delivers(&e8.frames(3, Duration::from_secs(30)))
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(got8, vec![6, 7, 8]);
    assert_eq!(
        delivers_within(&e7, Duration::from_secs(1)),
        Vec::<u64>::new()
    );
    // hana logs out of node 8: unknown to the cache again, so the core asks Redis, which is
    // down: the route is held for a retry, nothing is sent.
    tx.presence(&presence_event(b"hana", 8, false, 3_000));
    core.wait_metric("iris_core_cached_users", 1); // kim still
    tx.frame(&BusFrame::Deliver(msg(9, b"hana")));
    tx.flush();
    core.wait_metric("iris_core_retry_held", 1);
    assert_eq!(
        delivers_within(&e8, Duration::from_millis(500)),
        Vec::<u64>::new()
    );
    assert!(core.metric("iris_core_session_errors_total") >= 1);
}

#[test]
fn routes_held_while_redis_is_down_are_routed_when_it_returns() {
    let mut env = Env::start();
    let edge = env.edge(5);
    env.online(b"ivan", 5);
    let core = env.core();
    let tx = env.producer();
    tx.frame(&BusFrame::Deliver(msg(1, b"ivan")));
    tx.flush();
    assert_eq!(
        delivers(&edge.frames(1, Duration::from_secs(30)))[0].id,
        1,
        "routed by the Redis session"
    );
    env.redis.kill();
    for i in 2..=11 {
        tx.frame(&BusFrame::Deliver(msg(i, b"ivan")));
    }
    tx.flush();
    core.wait_metric("iris_core_retry_held", 10);
    assert_eq!(
        delivers_within(&edge, Duration::from_millis(500)),
        Vec::<u64>::new()
    );
    // Redis comes back (empty: it keeps nothing on disk); the edge writes the session again.
    env.redis.restart();
    env.online(b"ivan", 5);
    let got: Vec<u64> = delivers(&edge.frames(10, Duration::from_secs(30)))
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        got,
        (2..=11).collect::<Vec<_>>(),
        "held routes, in order, no login"
    );
    core.wait_metric("iris_core_retry_held", 0);
    assert_eq!(core.metric("iris_core_retry_routed_total"), 10);
    assert_eq!(core.metric("iris_core_offline_total"), 0);
}

/// Reads up to `want` delivers from `edge` within 60 s, playing the core's supervisor: the core
/// is started again whenever it exits for a restart (counted in `restarts`).
fn delivers_restarting(
    env: &Env,
    core: &mut Core,
    edge: &Edge,
    want: usize,
    restarts: &mut u32,
) -> Vec<Deliver> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        got.extend(delivers(
            &edge.frames(want - got.len(), Duration::from_secs(1)),
        ));
        if core.exited_for_a_restart() {
            *restarts += 1;
            *core = env.core();
        }
    }
    got
}

/// The broker loses its topics and another process (an edge restarting) re-creates them and
/// writes to them before the core's keeper looks: the topics are there, the logs are new. The
/// core had read jack's first message at offset 0 of its partition; the new log holds the second
/// one at that very offset. The keeper finds the record it read gone, the core exits for a
/// restart (status 75) and the restarted core reads the new log from its beginning. Before
/// the keeper compared the records, the core went on fetching from offset 1 of the new log
/// and never read the second message.
#[test]
fn topics_re_created_by_another_process_are_read_from_their_beginning() {
    let mut env = Env::start();
    let edge = env.edge(6);
    env.online(b"jack", 6);
    let mut core = env.core();
    let tx = env.producer();
    tx.frame(&BusFrame::Deliver(msg(1, b"jack")));
    tx.flush();
    assert_eq!(delivers(&edge.frames(1, Duration::from_secs(30))).len(), 1);
    core.wait_metric("iris_core_records_total", 1);
    drop(edge);
    drop(tx);
    env.tansu.restart();
    // What a restarting edge does at once: create the region's topics and write.
    let topics = [
        (deliver(REGION), PARTITIONS as i32),
        (presence(REGION), PARTITIONS as i32),
    ];
    ensure_topics(&env.kafka(), &topics).unwrap();
    let edge = env.edge(6);
    let tx = env.producer();
    let second = msg(2, b"jack");
    tx.frame(&BusFrame::Deliver(second.clone()));
    tx.flush();
    let mut restarts = 0;
    let got = delivers_restarting(&env, &mut core, &edge, 1, &mut restarts);
    assert_eq!(
        got,
        vec![second],
        "the message written to the new log (core restarts: {restarts}); the core's metrics:\n{}",
        core.metrics()
    );
    assert!(
        restarts >= 1,
        "the core read the new log without a restart?"
    );
    eprintln!("topics re-created by another process: read after {restarts} core restart(s)");
}

/// A memory broker restarted loses every topic, record and committed offset. The region
/// recovers: the core's keeper re-creates the deliver and presence topics and the core exits
/// with status 75 for a restart (or librdkafka crashed it first, see `Core::exited_for_a_restart`);
/// the restarted core reads the new logs from their beginning and messages flow. The test
/// plays the supervisor. (Operators: run tansu on sqlite or a real Kafka; README, "Running a
/// region".)
#[test]
fn a_memory_broker_restart_is_recovered_from() {
    let mut env = Env::start();
    let edge = env.edge(6);
    env.online(b"jack", 6);
    let mut core = env.core();
    let tx = env.producer();
    for i in 1..=3 {
        tx.frame(&BusFrame::Deliver(msg(i, b"jack")));
    }
    tx.flush();
    assert_eq!(delivers(&edge.frames(3, Duration::from_secs(30))).len(), 3);
    core.wait_metric("iris_core_records_total", 3);
    drop(edge);
    drop(tx);
    env.tansu.restart();
    let mut restarts = 0;
    let admin: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", env.brokers())
        .set("log_level", "3")
        .create()
        .unwrap();
    let parts = |topic: &str| {
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
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while parts(&deliver(REGION)) != PARTITIONS as usize
        || parts(&presence(REGION)) != PARTITIONS as usize
    {
        if core.exited_for_a_restart() {
            restarts += 1;
            drop(core);
            core = env.core();
        }
        assert!(
            Instant::now() < deadline,
            "topics not re-created within 30 s; tansu log:\n{}",
            env.tansu.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Messages flow again (the edge's inbox is re-created as an edge's keeper would).
    let edge = env.edge(6);
    let tx = env.producer();
    let sent: Vec<Deliver> = (4..=6).map(|i| msg(i, b"jack")).collect();
    for d in &sent {
        tx.frame(&BusFrame::Deliver(d.clone()));
    }
    tx.flush();
    let got = delivers_restarting(&env, &mut core, &edge, sent.len(), &mut restarts);
    assert_eq!(
        got,
        sent,
        "messages after the restart (core restarts: {restarts}); the core's metrics:\n{}",
        core.metrics()
    );
    eprintln!("memory broker restart recovered; core restarts: {restarts}");
}
