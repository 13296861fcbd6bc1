//! The `iris-core` binary against a real broker and a real Redis: each test starts its own tansu
//! (memory storage) and `redis-server` on free loopback ports, runs the real `iris-core`
//! process, plays the edges with plain rdkafka clients and kills everything when done.
//! Needs `tansu` on PATH or in ~/.cargo/bin and `redis-server` on PATH.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iris_bus::kafka::{ensure_topics, KafkaConfig};
use iris_bus::topics::{deliver, edge_inbox, partition_of};
use iris_bus::{decode, encode, to_owned, Ack, BusFrame, Deliver, DrainChunk, DrainRequest};
use iris_core::store::MessageStore;
use iris_tests::services::{Proc, RedisServer, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

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

    /// Starts `iris-core` and waits for its "serving" line.
    fn core(&self) -> Core {
        let mut child = Command::new(env!("CARGO_BIN_EXE_iris-core"))
            .args(["--brokers", &self.brokers(), "--redis", &self.redis_url()])
            .args(["--region", REGION, "--partitions", &PARTITIONS.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn iris-core");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("iris-core did not print its serving line within 30 s");
        assert_eq!(
            line.trim(),
            format!("iris-core serving region={REGION} partitions={PARTITIONS}")
        );
        Core(Proc(Some(child)))
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
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", format!("test-edge-{node}"))
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        Edge { consumer }
    }

    fn producer(&self) -> Sender {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("linger.ms", "1")
            .set("log_level", "3")
            .create()
            .unwrap();
        Sender { producer }
    }

    /// Writes an online session for `user` on edge `node` (raw Redis, the writer's layout).
    fn online(&self, user: &[u8], node: u32) {
        let mut c = redis::Client::open(self.redis_url())
            .unwrap()
            .get_connection()
            .unwrap();
        let key = iris_core::sessions::session_key(user);
        redis::cmd("HSET")
            .arg(key)
            .arg("node")
            .arg(node.to_string())
            .arg("shard")
            .arg(0)
            .arg("region")
            .arg(REGION)
            .arg("last_seen")
            .arg(0)
            .arg("online")
            .arg(1)
            .query::<()>(&mut c)
            .unwrap();
    }
}

/// A running `iris-core`.
struct Core(Proc);

impl Core {
    /// SIGTERM, then the exit status (at most 15 s).
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.0 .0.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("iris-core did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        self.0.kill9();
    }
}

/// Produces frames to the deliver topic, as an edge does.
struct Sender {
    producer: BaseProducer,
}

impl Sender {
    fn raw(&self, user: &[u8], payload: &[u8]) {
        let topic = deliver(REGION);
        let mut record = BaseRecord::to(&topic)
            .partition(partition_of(user, PARTITIONS) as i32)
            .key(user)
            .payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    fn frame(&self, frame: &BusFrame) {
        self.raw(frame.key_user(), &encode(frame).unwrap());
    }

    fn flush(&self) {
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }
}

/// Reads an edge inbox.
struct Edge {
    consumer: BaseConsumer,
}

impl Edge {
    /// Frames until `want` of them arrived or `timeout` passed.
    fn frames(&self, want: usize, timeout: Duration) -> Vec<BusFrame> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            if let Some(r) = self.consumer.poll(Duration::from_millis(50)) {
                let msg = r.unwrap();
                let archived = decode(msg.payload().unwrap()).unwrap();
                out.push(to_owned(archived).unwrap());
            }
        }
        out
    }

    /// The first drain chunk for connection `conn` (other frames skipped).
    fn chunk(&self, conn: u64) -> DrainChunk {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for f in self.frames(1, Duration::from_millis(200)) {
                if let BusFrame::DrainChunk(c) = f {
                    if c.conn == conn {
                        return c;
                    }
                }
            }
        }
        panic!("no drain chunk for conn {conn} within 30 s");
    }
}

fn msg(id: u64, to: &[u8]) -> Deliver {
    Deliver {
        id,
        recipient: to.to_vec(),
        sender: b"alice".to_vec(),
        payload: format!("hello {id}").into_bytes(),
        origin: REGION.to_owned(),
    }
}

fn drain(user: &[u8], node: u32, conn: u64, limit: u32) -> BusFrame {
    BusFrame::DrainRequest(DrainRequest {
        user: user.to_vec(),
        node,
        shard: 1,
        conn,
        after: 0,
        limit,
    })
}

fn ids(chunk: &DrainChunk) -> Vec<u64> {
    chunk.messages.iter().map(|m| m.id).collect()
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
    let got: Vec<Deliver> = got
        .into_iter()
        .filter_map(|f| match f {
            BusFrame::Deliver(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(got, sent, "routed delivers, in order and equal");
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
    let part = edge.chunk(2);
    assert_eq!(ids(&part), (1..=40).collect::<Vec<_>>());
    assert!(part.more);
    // Nothing was routed: carol has no session.
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
    let _core = env.core();
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
    // The chunk is produced only after the durable commit: everything before it was consumed.
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
fn corrupted_records_are_skipped() {
    let env = Env::start();
    let edge = env.edge(6);
    env.online(b"frank", 6);
    let _core = env.core();
    let tx = env.producer();
    tx.raw(b"frank", b"\x01garbage that is no archive");
    tx.raw(b"frank", b"\x63unknown version");
    tx.raw(b"frank", b"");
    let good = msg(1, b"frank");
    tx.frame(&BusFrame::Deliver(good.clone()));
    tx.frame(&drain(b"frank", 6, 9, 10));
    tx.flush();
    let chunk = edge.chunk(9);
    assert_eq!(ids(&chunk), vec![1]);
    // The deliver was routed too (frank is online): read the inbox again from the start.
    let mut routed = Vec::new();
    let edge2 = env.edge(6);
    for f in edge2.frames(2, Duration::from_secs(10)) {
        if let BusFrame::Deliver(d) = f {
            routed.push(d);
        }
    }
    assert_eq!(routed, vec![good]);
}
