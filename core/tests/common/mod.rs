//! The harness shared by the `iris-core` integration tests (`import`, `service`,
//! `remote_regions`): spawning the real `iris-core` binary and reading its ready line, the
//! [`Core`] process wrapper with its admin-endpoint helpers (`/metrics` samples, waits, SIGTERM),
//! a raw-record producer ([`Sender`]), a consumer reading topic partitions from their beginning,
//! and small frame helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iris_bus::{decode, to_owned, BusFrame, Deliver, DrainChunk};
use iris_tests::services::Proc;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

/// Spawns `iris-core` with `args` (RUST_LOG from `IRIS_CORE_LOG`, default `warn`; stdout
/// piped) and returns it with its first stdout line (untrimmed), which must arrive within
/// `ready_within`.
pub fn spawn_core<I, S>(args: I, ready_within: Duration) -> (Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_iris-core"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("IRIS_CORE_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
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
    let line = rx.recv_timeout(ready_within).unwrap_or_else(|_| {
        panic!(
            "iris-core did not print its ready line within {} s",
            ready_within.as_secs()
        )
    });
    (child, line)
}

/// The `admin=` address of a ready line.
pub fn admin_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("no admin address in {line:?}"))
        .to_owned()
}

/// A running `iris-core` and its admin address.
pub struct Core {
    pub proc: Proc,
    pub admin: String,
    /// [`Core::metric`] reads an absent sample as 0 (otherwise it panics).
    pub missing_is_zero: bool,
    /// How long [`Core::terminate`] waits for the exit after SIGTERM.
    pub terminate_within: Duration,
}

impl Core {
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Whether the process has exited for a restart after its broker lost the topics: with
    /// status 75 once its keeper re-created them (`CoreError::TopicsLost`), or of SIGSEGV before
    /// that, as librdkafka 2.12.1 (rdkafka-sys 4.10) can crash in `rd_kafka_metadata_update_op`
    /// when a consumer fetches a partition the broker lost (tansu answers with KIP-951 leader
    /// tags and a zero topic id; librdkafka looks the topic up by a NULL name). `false` while it
    /// runs; any other exit fails the test.
    #[allow(dead_code)] // not every test file plays the supervisor
    pub fn exited_for_a_restart(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        match self.proc.0.as_mut().unwrap().try_wait().unwrap() {
            None => false,
            Some(status) if status.signal() == Some(11) || status.code() == Some(75) => true,
            Some(status) => panic!("iris-core exited: {status:?}"),
        }
    }

    /// SIGTERM, then the exit status (at most `terminate_within`).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.proc.0.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let deadline = Instant::now() + self.terminate_within;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "iris-core did not exit within {} s of SIGTERM",
                    self.terminate_within.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the admin endpoint: (status code, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.admin).expect("connect to the admin endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {resp:?}"));
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The `/metrics` body.
    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body
    }

    /// The value of sample `name` (labels included) in `/metrics`; an absent one is 0 or a
    /// panic (see `missing_is_zero`).
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.metrics();
        match sample(&body, name) {
            Some(v) => v,
            None if self.missing_is_zero => 0,
            None => panic!("no sample {name} in:\n{body}"),
        }
    }

    /// Waits until `metric(name) == want` (at most 30 s).
    pub fn wait_metric(&self, name: &str, want: u64) {
        let mut last = u64::MAX;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            last = self.metric(name);
            if last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{name} is {last}, expected {want}\n{}", self.metrics());
    }
}

/// The value of sample `name` (the text before the value, labels included) in a Prometheus
/// text body.
pub fn sample(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Produces raw records; the broker's refusals are kept (see [`Sender::failures`]).
pub struct Sender {
    pub producer: BaseProducer<Refusals>,
}

/// A producer context that keeps every failed delivery's error.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<Vec<String>>>);

impl ClientContext for Refusals {}

impl ProducerContext for Refusals {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let at = format!("{}/{}", m.topic(), m.partition());
            self.0.lock().unwrap().push(format!("{at}: {e}"));
        }
    }
}

impl Sender {
    pub fn new(brokers: &str) -> Sender {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "1")
            .set("log_level", "3")
            .create_with_context(Refusals::default())
            .unwrap();
        Sender { producer }
    }

    /// The deliveries the broker refused (or that timed out) so far.
    pub fn failures(&self) -> Vec<String> {
        self.producer.context().0.lock().unwrap().clone()
    }

    pub fn raw_to(&self, topic: &str, partition: i32, key: &[u8], payload: &[u8]) {
        let mut record = BaseRecord::to(topic)
            .partition(partition)
            .key(key)
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
}

/// A consumer in group `group` (no auto commit, plus the `extra` settings) assigned `parts`
/// (topic, partition) from their beginning.
pub fn consumer_from_beginning(
    brokers: &str,
    group: &str,
    extra: &[(&str, &str)],
    parts: &[(String, i32)],
) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("log_level", "3");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition_offset(t, *p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    consumer
}

/// Decoded frames from `consumer` until `want` of them arrived or `timeout` passed.
pub fn read_frames(consumer: &BaseConsumer, want: usize, timeout: Duration) -> Vec<BusFrame> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(r) = consumer.poll(Duration::from_millis(50)) {
            let msg = r.unwrap();
            out.push(to_owned(decode(msg.payload().unwrap()).unwrap()).unwrap());
        }
    }
    out
}

/// Writes an online session for `user` on edge `node` of `region` (raw Redis, the writer's
/// layout).
pub fn write_online(redis_url: &str, region: &str, user: &[u8], node: u32) {
    let mut c = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("HSET")
        .arg(iris_core::sessions::session_key(user))
        .arg("node")
        .arg(node.to_string())
        .arg("shard")
        .arg(0)
        .arg("region")
        .arg(region)
        .arg("last_seen")
        .arg(0)
        .arg("online")
        .arg(1)
        .query::<()>(&mut c)
        .unwrap();
}

pub fn ids(chunk: &DrainChunk) -> Vec<u64> {
    chunk.messages.iter().map(|m| m.id).collect()
}

pub fn delivers(frames: &[BusFrame]) -> Vec<Deliver> {
    frames
        .iter()
        .filter_map(|f| match f {
            BusFrame::Deliver(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}
