//! Producer throughput of one producer thread: 100-byte frames, acks=all, idempotence,
//! linger 5 ms, lz4, fed through one ring by one feeder thread, until every frame is
//! acknowledged by the broker.
//!
//! `cargo bench -p iris-bus --bench producer`. Against a running broker with
//! `IRIS_BENCH_BROKERS=host:port`; otherwise it starts its own tansu (memory storage) on a
//! free loopback port. `IRIS_BENCH_FRAMES` (default 1,000,000), `IRIS_BENCH_COMPRESSION`
//! (default lz4), `IRIS_BENCH_PARTITIONS` (default 4).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iris_bus::kafka::{ensure_topics, KafkaConfig, KafkaProducer, OutFrame};

struct Broker(Option<Child>);

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The broker to use: `IRIS_BENCH_BROKERS`, or a tansu of our own.
fn broker() -> (String, Broker) {
    if let Ok(b) = std::env::var("IRIS_BENCH_BROKERS") {
        return (b, Broker(None));
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let home = std::env::var("HOME").unwrap_or_default();
    let bin = ["tansu".to_owned(), format!("{home}/.cargo/bin/tansu")]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("tansu not found: run scripts/kafka.sh install");
    let child = Command::new(bin)
        .current_dir("/")
        .args(["broker", "--cluster-id", "iris-bench"])
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu could not be started");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tansu did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (format!("127.0.0.1:{port}"), Broker(Some(child)))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag: do a
    // short smoke run then.
    let bench = std::env::args().any(|a| a == "--bench");
    let frames: u64 = env_or("IRIS_BENCH_FRAMES", if bench { 1_000_000 } else { 10_000 });
    let partitions: i32 = env_or("IRIS_BENCH_PARTITIONS", 4);
    let compression: String = env_or("IRIS_BENCH_COMPRESSION", "lz4".to_owned());
    let (brokers, _broker) = broker();
    let cfg = KafkaConfig {
        brokers,
        client_id: "iris-bench".to_owned(),
        compression,
        ..KafkaConfig::default()
    };
    let topic = format!("iris.bench.producer.{}", std::process::id());
    ensure_topics(&cfg, &[(topic.clone(), partitions)]).unwrap();
    let topic: Arc<str> = Arc::from(topic.as_str());

    let (producer, rings) = KafkaProducer::start(&cfg, 1).unwrap();
    let ring = rings.into_iter().next().unwrap();
    let payload = vec![0x5a_u8; 100];
    let start = Instant::now();
    let feeder = {
        let topic = Arc::clone(&topic);
        std::thread::spawn(move || {
            let mut full_spins = 0u64;
            for i in 0..frames {
                let mut frame = OutFrame {
                    topic: Arc::clone(&topic),
                    partition: (i % partitions as u64) as i32,
                    key: None,
                    payload: payload.clone(),
                    ticket: 0,
                };
                while let Err(f) = ring.try_send(frame) {
                    frame = f;
                    full_spins += 1;
                    std::thread::yield_now();
                }
            }
            full_spins
        })
    };
    let full_spins = feeder.join().unwrap();
    while producer.stats().produced_ok < frames {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed();
    let stats = producer.flush_and_stop(Duration::from_secs(10)).unwrap();
    let rate = frames as f64 / elapsed.as_secs_f64();
    println!(
        "producer: {frames} frames x 100 B, {partitions} partitions, compression {}, acks=all, \
         idempotence, linger {} ms: {:.3} s, {:.0} frames/s acknowledged \
         (queue_full_events {}, ring full spins {full_spins}, delivery_errors {})",
        cfg.compression,
        cfg.linger_ms,
        elapsed.as_secs_f64(),
        rate,
        stats.queue_full_events,
        stats.delivery_errors,
    );
}
