//! The Kafka transport against a real broker: each test starts its own tansu on a free
//! loopback port (memory storage, or a sqlite file where the data must survive a restart) and
//! kills it when done. Needs `tansu` on PATH or in ~/.cargo/bin (`scripts/kafka.sh install`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, Receiver};
use iris_bus::kafka::{
    ensure_topics, ensure_topics_within, route_by_partition, InFrame, KafkaConfig, KafkaConsumer,
    KafkaProducer, OutFrame, ReadMarks, TopicKeeper,
};
use iris_bus::{decode_counted, encode, BusFrame, Deliver, FrameStats};
use iris_tests::services::{free_port, wait_for, Tansu};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The client configuration of this test's broker.
trait BrokerConfig {
    fn config(&self, client_id: &str) -> KafkaConfig;
}

impl BrokerConfig for Tansu {
    fn config(&self, client_id: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers(),
            client_id: client_id.to_owned(),
            ..KafkaConfig::default()
        }
    }
}

/// Receives from all `rxs` until `want` frames arrived or `timeout` passed.
fn collect(rxs: &[Receiver<InFrame>], want: usize, timeout: Duration) -> Vec<InFrame> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(want);
    while out.len() < want && Instant::now() < deadline {
        let mut got = false;
        for rx in rxs {
            while let Ok(f) = rx.try_recv() {
                out.push(f);
                got = true;
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    out
}

/// Pushes `frame` into `ring`, retrying while it is full (at most 10 s).
fn send_retrying(ring: &iris_bus::kafka::ProducerRing, mut frame: OutFrame) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ring.try_send(frame) {
            Ok(()) => return,
            Err(f) => {
                assert!(Instant::now() < deadline, "ring stayed full for 10 s");
                frame = f;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

#[test]
fn produces_and_consumes_10000_frames_exactly_once_in_order() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-roundtrip");
    let topic = "iris.test.roundtrip".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 4)]).unwrap();

    let (producer, rings) = KafkaProducer::start(&cfg, 2).unwrap();
    let topic_arc: Arc<str> = Arc::from(topic.as_str());
    const PER_RING: usize = 5_000;
    std::thread::scope(|s| {
        for (r, ring) in rings.iter().enumerate() {
            let topic_arc = Arc::clone(&topic_arc);
            s.spawn(move || {
                for seq in 0..PER_RING {
                    let frame = OutFrame {
                        topic: Arc::clone(&topic_arc),
                        partition: (seq % 4) as i32,
                        key: None,
                        payload: format!("{r}:{seq}").into_bytes(),
                        ticket: 0,
                    };
                    send_retrying(ring, frame);
                }
            });
        }
    });

    let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| bounded::<InFrame>(1024)).unzip();
    let consumer = KafkaConsumer::start(
        &cfg,
        "g-roundtrip",
        vec![topic.clone()],
        txs,
        route_by_partition,
    )
    .unwrap();
    let frames = collect(&rxs, 2 * PER_RING, Duration::from_secs(30));
    let pstats = producer.flush_and_stop(Duration::from_secs(10)).unwrap();
    assert_eq!(pstats.frames_in, 2 * PER_RING as u64);
    assert_eq!(pstats.produced_ok, 2 * PER_RING as u64);
    assert_eq!(pstats.delivery_errors, 0);
    assert_eq!(
        frames.len(),
        2 * PER_RING,
        "consumed {} frames",
        frames.len()
    );

    // Exactly once per (partition, offset) and per payload; offsets increase per partition.
    let mut seen_at = HashSet::new();
    let mut payloads = HashSet::new();
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut last_seq: HashMap<(i32, usize), usize> = HashMap::new();
    for f in &frames {
        assert_eq!(&*f.topic, topic.as_str());
        assert!(seen_at.insert((f.partition, f.offset)), "duplicate {f:?}");
        assert!(
            payloads.insert(f.payload.clone()),
            "duplicate payload {f:?}"
        );
        if let Some(prev) = last_offset.insert(f.partition, f.offset) {
            assert!(
                f.offset > prev,
                "offsets out of order on partition {}",
                f.partition
            );
        }
        // Route: partition p went to output p mod 2 (checked through the ring order below).
        let text = std::str::from_utf8(&f.payload).unwrap();
        let (r, seq) = text.split_once(':').unwrap();
        let (r, seq): (usize, usize) = (r.parse().unwrap(), seq.parse().unwrap());
        assert_eq!(
            f.partition as usize,
            seq % 4,
            "frame on the wrong partition"
        );
        if let Some(prev) = last_seq.insert((f.partition, r), seq) {
            assert!(
                seq > prev,
                "ring {r} frames out of order on partition {}",
                f.partition
            );
        }
    }
    let cstats = consumer.stop().unwrap();
    assert_eq!(cstats.frames, 2 * PER_RING as u64);
}

#[test]
fn consumer_routes_partitions_to_their_outputs() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-route");
    let topic = "iris.test.route".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 4)]).unwrap();
    let (producer, rings) = KafkaProducer::start(&cfg, 1).unwrap();
    let t: Arc<str> = Arc::from(topic.as_str());
    for i in 0..40 {
        send_retrying(
            &rings[0],
            OutFrame {
                topic: Arc::clone(&t),
                partition: i % 4,
                key: Some(vec![i as u8]),
                payload: vec![i as u8],
                ticket: 0,
            },
        );
    }
    producer.flush_and_stop(Duration::from_secs(10)).unwrap();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| bounded::<InFrame>(64)).unzip();
    let _consumer = KafkaConsumer::start(&cfg, "g-route", vec![topic], txs, |p, n| {
        (p as usize + 1) % n
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = 0;
    while got < 40 && Instant::now() < deadline {
        for (i, rx) in rxs.iter().enumerate() {
            while let Ok(f) = rx.try_recv() {
                assert_eq!(
                    (f.partition as usize + 1) % 3,
                    i,
                    "frame on the wrong output"
                );
                got += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(got, 40);
}

fn partitions_of(cfg: &KafkaConfig, topic: &str) -> usize {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    md.topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len())
}

#[test]
fn ensure_topics_is_idempotent() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-topics");
    let a = ("iris.test.a".to_owned(), 3);
    let b = ("iris.test.b".to_owned(), 2);
    ensure_topics(&cfg, std::slice::from_ref(&a)).unwrap();
    ensure_topics(&cfg, std::slice::from_ref(&a)).unwrap();
    ensure_topics(&cfg, &[a.clone(), b.clone()]).unwrap();
    ensure_topics(&cfg, &[a.clone(), b.clone()]).unwrap();
    assert_eq!(partitions_of(&cfg, &a.0), 3);
    assert_eq!(partitions_of(&cfg, &b.0), 2);
}

/// A memory broker restarted loses every topic; the keeper (checking every 200 ms) re-creates
/// them with their partition counts, and counts it. No consumer runs here: librdkafka 2.12.1
/// consumers of a lost partition can crash (see the core's service tests).
#[test]
fn keeper_recreates_topics_lost_by_a_memory_broker_restart() {
    init_tracing();
    let mut broker = Tansu::memory();
    let cfg = broker.config("t-keeper");
    let topics = vec![
        ("iris.test.kept.a".to_owned(), 3),
        ("iris.test.kept.b".to_owned(), 2),
    ];
    ensure_topics(&cfg, &topics).unwrap();
    let keeper = TopicKeeper::start(&cfg, topics.clone(), Duration::from_millis(200)).unwrap();
    wait_for("a first check", Duration::from_secs(20), || {
        keeper.stats().checks >= 1
    });
    assert_eq!(keeper.stats().recreated, 0, "nothing was missing yet");
    broker.restart();
    wait_for("both topics re-created", Duration::from_secs(30), || {
        keeper.stats().recreated >= 2
    });
    assert_eq!(partitions_of(&cfg, &topics[0].0), 3);
    assert_eq!(partitions_of(&cfg, &topics[1].0), 2);
    // Nothing more to do once they exist.
    let before = keeper.stats();
    wait_for("two more checks", Duration::from_secs(20), || {
        keeper.stats().checks >= before.checks + 2
    });
    assert_eq!(keeper.stats().recreated, before.recreated);
    keeper.stop();
}

/// Writes `payloads` to `partition` of `topic` in one batch (linger 200 ms), flushed.
fn produce_batch(brokers: &str, topic: &str, partition: i32, payloads: &[&[u8]]) {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "200")
        .create()
        .unwrap();
    for &payload in payloads {
        p.send(
            BaseRecord::<(), _>::to(topic)
                .partition(partition)
                .payload(payload),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

/// Reads `want` records of `topic` from the beginning of its partitions and notes each in
/// `marks`, as a consumer handing them on would.
fn read_and_mark(brokers: &str, topic: &str, partitions: i32, want: usize, marks: &ReadMarks) {
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "t-marks")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = HashSet::new();
    while seen.len() < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records",
            seen.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            if seen.insert((m.partition(), m.offset())) {
                let ts = m.timestamp().to_millis().unwrap_or(-1);
                marks.note(
                    m.partition(),
                    m.offset(),
                    ts,
                    m.payload().unwrap_or_default(),
                );
            }
        }
    }
}

/// A topic re-created by another process is present when the keeper looks, but its log is new:
/// the keeper finds it from the records a consumer read last ([`ReadMarks`]). Partition 0's
/// mark lies inside a batch of five (tansu's high watermark points at the batch's first
/// record); partition 1's new log holds another record at the very offset of its mark. Before
/// the restart, several checks of the same logs find nothing replaced.
#[test]
fn keeper_finds_a_log_replaced_by_another_process() {
    init_tracing();
    let mut broker = Tansu::memory();
    let cfg = broker.config("t-marks");
    let topic = "iris.test.marked";
    let topics = vec![(topic.to_owned(), 2)];
    ensure_topics(&cfg, &topics).unwrap();
    produce_batch(&cfg.brokers, topic, 0, &[b"a0", b"a1", b"a2", b"a3", b"a4"]);
    produce_batch(&cfg.brokers, topic, 1, &[b"b0"]);
    let marks = ReadMarks::new(topic);
    read_and_mark(&cfg.brokers, topic, 2, 6, &marks);
    let every = Duration::from_millis(200);
    let keeper = TopicKeeper::start_watching(
        &cfg,
        topics.clone(),
        every,
        Some((Arc::clone(&marks), every)),
    )
    .unwrap();
    wait_for("four checks", Duration::from_secs(30), || {
        keeper.stats().checks >= 4
    });
    let s = keeper.stats();
    assert_eq!(
        (s.recreated, s.replaced),
        (0, 0),
        "the logs read are still there: {s:?}"
    );
    keeper.stop();
    // Another process re-creates the topic after the restart and writes to it before this
    // keeper looks again (it is stopped meanwhile, so it cannot re-create the topic itself).
    broker.restart();
    ensure_topics(&cfg, &topics).unwrap();
    produce_batch(&cfg.brokers, topic, 0, &[b"new a0"]);
    produce_batch(&cfg.brokers, topic, 1, &[b"new b0"]);
    let keeper =
        TopicKeeper::start_watching(&cfg, topics, every, Some((Arc::clone(&marks), every)))
            .unwrap();
    let watch = keeper.recreations();
    wait_for("both replaced logs found", Duration::from_secs(30), || {
        keeper.stats().replaced >= 2
    });
    assert_eq!(
        watch.of(topic),
        2,
        "each replaced log counts as a re-creation"
    );
    // Reported once each: the marks of the lost logs are dropped.
    let before = keeper.stats();
    wait_for("two more checks", Duration::from_secs(20), || {
        keeper.stats().checks >= before.checks + 2
    });
    assert_eq!(keeper.stats().replaced, 2);
    keeper.stop();
}

#[test]
fn ensure_topics_fails_when_no_broker_answers() {
    // Nothing listens on this port; the error comes after the bounded wait, not a hang.
    let cfg = KafkaConfig {
        brokers: format!("127.0.0.1:{}", free_port()),
        ..KafkaConfig::default()
    };
    let start = Instant::now();
    let err = ensure_topics_within(
        &cfg,
        &[("iris.test.none".to_owned(), 1)],
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            iris_bus::kafka::TransportError::BrokerUnreachable { .. }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn deliver(id: u64) -> Vec<u8> {
    encode(&BusFrame::Deliver(Deliver {
        id,
        recipient: b"bob".to_vec(),
        sender: b"alice".to_vec(),
        payload: format!("hello {id}").into_bytes(),
        origin: "eu".to_owned(),
        kind: 0,
        confirm: None,
    }))
    .unwrap()
}

#[test]
fn corrupted_record_is_skipped_and_the_consumer_goes_on() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-corrupt");
    let topic = "iris.test.corrupt".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 1)]).unwrap();

    // A plain rdkafka producer writes good frames around two bad records, in one partition.
    let plain: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let mut corrupt = deliver(99);
    let last = corrupt.len() - 1;
    corrupt[1..last].iter_mut().for_each(|b| *b = 0xff);
    let unknown_version = {
        let mut v = deliver(98);
        v[0] = 200;
        v
    };
    let records: Vec<Vec<u8>> = (0..5)
        .map(deliver)
        .chain([corrupt, unknown_version])
        .chain((5..10).map(deliver))
        .collect();
    for r in &records {
        plain
            .send(BaseRecord::<(), _>::to(&topic).partition(0).payload(r))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    plain.flush(Duration::from_secs(10)).unwrap();

    let (tx, rx) = bounded::<InFrame>(64);
    let consumer =
        KafkaConsumer::start(&cfg, "g-corrupt", vec![topic], vec![tx], route_by_partition).unwrap();
    let frames = collect(
        std::slice::from_ref(&rx),
        records.len(),
        Duration::from_secs(20),
    );
    assert_eq!(frames.len(), records.len());
    let stats = FrameStats::new();
    let mut ids = Vec::new();
    for f in &frames {
        if let Ok(iris_bus::ArchivedBusFrame::Deliver(d)) = decode_counted(&stats, &f.payload) {
            ids.push(d.id.to_native());
        }
    }
    assert_eq!(ids, (0..10).collect::<Vec<u64>>());
    let counts = stats.counts();
    assert_eq!(
        (counts.ok, counts.invalid, counts.unknown_version),
        (10, 1, 1)
    );
    assert_eq!(consumer.stats().frames, 12);
}

#[test]
fn broker_down_fills_the_rings_and_nothing_accepted_is_lost() {
    init_tracing();
    let mut broker = Tansu::sqlite();
    let cfg = KafkaConfig {
        ring_capacity: 500,
        queue_max_messages: 1_000,
        ..broker.config("t-down")
    };
    let topic = "iris.test.down".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 2)]).unwrap();
    let (producer, rings) = KafkaProducer::start(&cfg, 1).unwrap();
    let ring = &rings[0];
    let t: Arc<str> = Arc::from(topic.as_str());
    let frame = |seq: u64| OutFrame {
        topic: Arc::clone(&t),
        partition: (seq % 2) as i32,
        key: None,
        payload: seq.to_le_bytes().to_vec(),
        ticket: seq + 1,
    };

    // Up: 100 frames acknowledged.
    let mut accepted = 0u64;
    for _ in 0..100 {
        send_retrying(ring, frame(accepted));
        accepted += 1;
    }
    wait_for("the first 100 acks", Duration::from_secs(15), || {
        producer.stats().produced_ok == 100
    });

    // Down: rdkafka's queue fills, then the ring; try_send reports full, nothing panics.
    broker.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ring.try_send(frame(accepted)).is_ok() {
        accepted += 1;
        assert!(Instant::now() < deadline, "the ring never reported full");
        if accepted.is_multiple_of(100) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let s = producer.stats();
    assert!(s.ring_full >= 1 && s.queue_full_events >= 1, "{s:?}");
    assert!(
        ring.len() == ring.capacity(),
        "ring not full: {}",
        ring.len()
    );
    // Bounded: everything accepted is in the ring, held by the thread, or in rdkafka.
    assert!(accepted - 100 <= (cfg.ring_capacity + cfg.queue_max_messages + 1) as u64);
    // Stays full while the broker is down.
    std::thread::sleep(Duration::from_millis(500));
    assert!(ring.try_send(frame(accepted)).is_err());

    // Back: everything accepted is produced, then consumed.
    broker.restart();
    wait_for(
        "every accepted frame acknowledged",
        Duration::from_secs(30),
        || producer.stats().produced_ok >= accepted,
    );
    // A frame that can never be produced (no such partition) is reported too, not acked.
    send_retrying(
        ring,
        OutFrame {
            partition: 99,
            ticket: u64::MAX,
            ..frame(0)
        },
    );
    let s = producer.flush_and_stop(Duration::from_secs(10)).unwrap();
    assert_eq!(s.frames_in, accepted + 1);
    assert_eq!(s.rejected, 1, "{s:?}");

    // Every ticket is reported exactly once: acked for the accepted frames, not for the bad one.
    let mut done = Vec::new();
    ring.take_done(&mut done);
    let mut acked: Vec<u64> = done.iter().filter(|d| d.acked).map(|d| d.ticket).collect();
    acked.sort_unstable();
    assert_eq!(acked, (1..=accepted).collect::<Vec<_>>());
    let refused: Vec<u64> = done.iter().filter(|d| !d.acked).map(|d| d.ticket).collect();
    assert_eq!(refused, vec![u64::MAX]);

    let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| bounded::<InFrame>(4096)).unzip();
    let _consumer =
        KafkaConsumer::start(&cfg, "g-down", vec![topic], txs, route_by_partition).unwrap();
    let frames = collect(&rxs, accepted as usize, Duration::from_secs(20));
    let seqs: HashSet<u64> = frames
        .iter()
        .map(|f| u64::from_le_bytes(f.payload[..8].try_into().unwrap()))
        .collect();
    let missing: Vec<u64> = (0..accepted).filter(|s| !seqs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {accepted} accepted frames lost, first {:?}; tansu log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        broker.log()
    );
}

/// Commits `offset` for `group` on partition 0 of `topic`.
fn commit(cfg: &KafkaConfig, group: &str, topic: &str, offset: i64) {
    use rdkafka::consumer::CommitMode;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

/// Produces one frame per payload to partition 0 of `topic` and waits for the broker's acks.
fn produce_all(cfg: &KafkaConfig, topic: &str, payloads: &[u8]) {
    let (producer, rings) = KafkaProducer::start(cfg, 1).unwrap();
    let t: Arc<str> = Arc::from(topic);
    for &p in payloads {
        send_retrying(
            &rings[0],
            OutFrame {
                topic: Arc::clone(&t),
                partition: 0,
                key: None,
                payload: vec![p],
                ticket: 0,
            },
        );
    }
    producer.flush_and_stop(Duration::from_secs(10)).unwrap();
}

/// A committed offset beyond the log's end (written by a process that still read a log the
/// broker lost, into the re-created one) is not followed: the assigned consumer reads the log
/// from its beginning. A committed offset inside the log, or at its end, is followed.
#[test]
fn assigned_consumer_reads_from_the_beginning_when_its_committed_offset_is_beyond_the_end() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-beyond");
    let topic = "iris.test.beyond".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 1)]).unwrap();
    // Two produce runs: offset 3 starts the second one's records.
    produce_all(&cfg, &topic, &[0, 1, 2]);
    produce_all(&cfg, &topic, &[3, 4]);
    commit(&cfg, "g-beyond", &topic, 50);
    commit(&cfg, "g-within", &topic, 3);
    // Everything read: not read again.
    commit(&cfg, "g-end", &topic, 5);
    for (group, want) in [
        ("g-within", vec![3u8, 4]),
        ("g-end", vec![]),
        ("g-beyond", vec![0, 1, 2, 3, 4]),
    ] {
        let (tx, rx) = bounded::<InFrame>(64);
        let consumer =
            KafkaConsumer::start_assigned(&cfg, group, &[(topic.clone(), 0)], vec![tx], |_, _| 0)
                .unwrap();
        let wait = if want.is_empty() { 3 } else { 20 };
        let got = collect(
            std::slice::from_ref(&rx),
            want.len().max(1),
            Duration::from_secs(wait),
        );
        let payloads: Vec<u8> = got.iter().map(|f| f.payload[0]).collect();
        assert_eq!(payloads, want, "group {group}");
        // Nothing more comes.
        assert!(collect(&[rx], 1, Duration::from_millis(500)).is_empty());
        consumer.stop().unwrap();
    }
}

/// Writes `payloads` to partition 0 of `topic` as one record batch (one produce request).
fn produce_one_batch(cfg: &KafkaConfig, topic: &str, payloads: &[u8]) {
    let plain: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("linger.ms", "1000")
        .set("batch.num.messages", "100000")
        .create()
        .unwrap();
    for p in payloads {
        plain
            .send(
                BaseRecord::<(), _>::to(topic)
                    .partition(0)
                    .payload(std::slice::from_ref(p)),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    plain.flush(Duration::from_secs(10)).unwrap();
}

/// tansu 0.6 answers a fetch from inside a record batch with the next batch. A consumer
/// restarted at its committed offset (usually inside a batch) must still get every record from
/// that offset on, once each and in order: it starts a little earlier, seeks back further when
/// the batch holding its offset began earlier still, and drops what lies before the committed
/// offset.
#[test]
fn assigned_consumer_starts_exactly_at_a_committed_offset_inside_a_record_batch() {
    init_tracing();
    let broker = Tansu::memory();
    let cfg = broker.config("t-midbatch");
    let topic = "iris.test.midbatch".to_owned();
    ensure_topics(&cfg, &[(topic.clone(), 1)]).unwrap();
    // Payload: the offset / 8, to check each record is the one its offset names.
    let payload = |o: usize| (o / 8) as u8;
    // 15 batches of 40 (0, 40, ..., 560), one of 1,000 (600..1600), one of 40 (1600..1640).
    for run in 0..15 {
        let payloads: Vec<u8> = (run * 40..run * 40 + 40).map(payload).collect();
        produce_all(&cfg, &topic, &payloads);
    }
    produce_one_batch(&cfg, &topic, &(600..1600).map(payload).collect::<Vec<u8>>());
    produce_all(
        &cfg,
        &topic,
        &(1600..1640).map(payload).collect::<Vec<u8>>(),
    );
    let total = 1640i64;
    // (committed offset, whether the guard must seek back beyond its early start):
    // inside the first batch; one past a batch's start; a batch's start; deep inside a batch
    // of 40; deep inside the batch of 1,000 (its start lies more than the first back step
    // before); inside the last batch (tansu answers a fetch there with nothing until more is
    // written); the end.
    for (committed, seeks) in [
        (20i64, false),
        (41, false),
        (40, false),
        (300, false),
        (1300, true),
        (1620, false),
        (1640, false),
    ] {
        let group = format!("g-midbatch-{committed}");
        commit(&cfg, &group, &topic, committed);
        let (tx, rx) = bounded::<InFrame>(2048);
        let consumer =
            KafkaConsumer::start_assigned(&cfg, &group, &[(topic.clone(), 0)], vec![tx], |_, _| 0)
                .unwrap();
        let want = (total - committed) as usize;
        let got = collect(
            std::slice::from_ref(&rx),
            want.max(1),
            Duration::from_secs(if want == 0 { 3 } else { 30 }),
        );
        let offsets: Vec<i64> = got.iter().map(|f| f.offset).collect();
        let expected: Vec<i64> = (committed..total).collect();
        assert_eq!(
            offsets.first(),
            expected.first(),
            "committed {committed}: the first record handed over"
        );
        assert_eq!(offsets, expected, "committed {committed}");
        for f in &got {
            assert_eq!(
                f.payload,
                vec![payload(f.offset as usize)],
                "offset {}",
                f.offset
            );
        }
        // Nothing more comes: the records before the committed offset are not handed over.
        assert!(collect(&[rx], 1, Duration::from_millis(500)).is_empty());
        let stats = consumer.stop().unwrap();
        assert_eq!(
            stats.batch_seeks > 0,
            seeks,
            "committed {committed}: {stats:?}"
        );
    }
}
