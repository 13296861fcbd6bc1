//! Kafka transport of the regional cluster, on rdkafka (bundled librdkafka).
//!
//! Glommio shards never touch rdkafka: its clients run their own threads and its types are
//! meant for blocking OS threads, while shard tasks are not `Send`. So:
//!
//! - [`KafkaProducer`] owns one OS thread (pinned to [`KafkaConfig::producer_cpu`] when set)
//!   with one `BaseProducer` (acks=all, idempotence, linger, batch size, compression). Shards
//!   hand it [`OutFrame`]s through bounded lock-free rings ([`ProducerRing::try_send`] never
//!   blocks). When rdkafka's own queue is full (`QueueFull`: broker slow or down) the thread
//!   keeps the refused frame, stops draining the rings and only polls, so the rings fill and
//!   the shards see `Full`: memory stays bounded (rings + rdkafka's queue), nothing accepted is
//!   dropped, and it all flows again when the broker answers.
//! - [`KafkaConsumer`] owns one OS thread with a `BaseConsumer` in a consumer group; it copies
//!   each record into an [`InFrame`] and hands it to the owning shard's channel with a
//!   blocking send (the backpressure towards the broker), then commits offsets
//!   (at-least-once).
//! - [`ensure_topics`] creates the missing topics at startup; a [`TopicKeeper`] thread
//!   re-creates them later when the broker lost them (a memory-storage broker restarted).
//!
//! [`InFrame`] payloads are raw bytes: validate them with [`crate::decode_counted`], which
//! counts and skips bad frames.

mod consumer;
mod keeper;
mod producer;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

pub use consumer::{
    route_by_partition, start_offsets, ConsumerStats, InFrame, KafkaConsumer, OffsetGuard, Starts,
    Verdict, FIRST_BACK_STEP,
};
pub use keeper::{
    payload_hash, KeeperStats, Mark, ReadMarks, RecreationCursor, Recreations, TopicKeeper,
    MARKS_EVERY,
};
pub use producer::{Done, KafkaProducer, OutFrame, ProducerRing, ProducerStats, NO_TICKET};

/// Settings shared by the producer, the consumer and the admin client.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// `client.id`, shown in broker logs.
    pub client_id: String,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// `batch.size` in bytes: the most one partition batch holds.
    pub batch_bytes: usize,
    /// `compression.type`: `none`, `lz4` (built into librdkafka) or `zstd`.
    pub compression: String,
    /// Frames each [`ProducerRing`] holds before `try_send` reports it full.
    pub ring_capacity: usize,
    /// `message.timeout.ms`: 0 retries forever while the frame is in memory (the default:
    /// the bound on memory is the rings plus rdkafka's queue, not time).
    pub message_timeout_ms: u32,
    /// `queue.buffering.max.messages`: frames rdkafka holds (queued or in flight) before it
    /// answers `QueueFull`.
    pub queue_max_messages: usize,
    /// `queue.buffering.max.kbytes`: the same bound in KiB of payload.
    pub queue_max_kbytes: usize,
    /// Replication factor of the topics [`ensure_topics`] creates (3 in production).
    pub replication_factor: i32,
    /// CPU the producer thread is pinned to (`None`: not pinned).
    pub producer_cpu: Option<usize>,
    /// Consumer `fetch.wait.max.ms`: the longest a fetch waits at the broker for data. A broker
    /// that answers a waiting fetch only at this deadline (tansu does) adds up to this much
    /// latency to every consumed frame; Kafka answers as soon as data arrives.
    pub fetch_wait_max_ms: u32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:19092".to_owned(),
            client_id: "iris".to_owned(),
            linger_ms: 5,
            batch_bytes: 1 << 20,
            compression: "lz4".to_owned(),
            ring_capacity: 65_536,
            message_timeout_ms: 0,
            queue_max_messages: 100_000,
            queue_max_kbytes: 64 * 1024,
            replication_factor: 1,
            producer_cpu: None,
            fetch_wait_max_ms: 5,
        }
    }
}

impl KafkaConfig {
    /// The client settings every rdkafka client of this transport starts from.
    fn base_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // librdkafka's own logs go through `log`; keep them quiet unless asked.
            .set("log_level", "3");
        c
    }
}

/// Why the Kafka transport failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// rdkafka rejected the configuration or could not create a client.
    #[error("kafka client configuration rejected: {0}")]
    Config(#[source] rdkafka::error::KafkaError),
    /// The broker did not answer a metadata request within the allowed time.
    #[error("kafka broker {brokers} unreachable after {waited_ms} ms: {source}")]
    BrokerUnreachable {
        brokers: String,
        waited_ms: u64,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The broker refused to create a topic (other than "already exists").
    #[error("kafka topic {topic} could not be created: {code}")]
    TopicCreate {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// An admin request failed as a whole.
    #[error("kafka admin request failed: {0}")]
    Admin(#[source] rdkafka::error::KafkaError),
    /// Subscribing the consumer to its topics failed.
    #[error("kafka subscribe failed: {0}")]
    Subscribe(#[source] rdkafka::error::KafkaError),
    /// The transport's OS thread could not be started.
    #[error("kafka transport thread could not be spawned: {0}")]
    Thread(#[source] std::io::Error),
    /// Frames were still unacknowledged when the flush deadline passed.
    #[error("kafka flush timed out with {remaining} frame(s) not acknowledged")]
    FlushTimeout { remaining: u64 },
    /// The transport thread panicked.
    #[error("kafka transport thread panicked")]
    ThreadPanicked,
}

/// How long [`ensure_topics`] waits for the broker to answer at all.
pub const ENSURE_TOPICS_WAIT: Duration = Duration::from_secs(30);

/// Creates the topics of `topics` (name, partitions) that the broker does not have yet.
///
/// Tolerates "already exists" (another node won the race) and warns when an existing topic
/// has fewer partitions than asked. Retries the metadata request until the broker answers, at
/// most [`ENSURE_TOPICS_WAIT`], then fails with [`TransportError::BrokerUnreachable`].
pub fn ensure_topics(cfg: &KafkaConfig, topics: &[(String, i32)]) -> Result<(), TransportError> {
    ensure_topics_within(cfg, topics, ENSURE_TOPICS_WAIT)
}

/// [`ensure_topics`] waiting at most `max_wait` for the broker to answer.
pub fn ensure_topics_within(
    cfg: &KafkaConfig,
    topics: &[(String, i32)],
    max_wait: Duration,
) -> Result<(), TransportError> {
    let admin: AdminClient<DefaultClientContext> = cfg
        .base_client_config()
        .create()
        .map_err(TransportError::Config)?;
    let start = Instant::now();
    let metadata = loop {
        match admin.inner().fetch_metadata(
            None,
            Duration::from_secs(2).min(max_wait.max(Duration::from_millis(100))),
        ) {
            Ok(m) => break m,
            Err(source) if start.elapsed() >= max_wait => {
                return Err(TransportError::BrokerUnreachable {
                    brokers: cfg.brokers.clone(),
                    waited_ms: start.elapsed().as_millis() as u64,
                    source,
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, brokers = %cfg.brokers, "kafka metadata not answered yet, retrying");
                thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut existing = HashSet::new();
    for t in metadata.topics() {
        if t.error().is_some() {
            continue;
        }
        existing.insert(t.name().to_owned());
        if let Some((_, want)) = topics.iter().find(|(n, _)| n == t.name()) {
            if (t.partitions().len() as i32) < *want {
                tracing::warn!(
                    topic = t.name(),
                    have = t.partitions().len(),
                    want,
                    "kafka topic has fewer partitions than configured"
                );
            }
        }
    }
    let missing: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|(name, _)| !existing.contains(name))
        .map(|(name, parts)| {
            NewTopic::new(
                name,
                *parts,
                TopicReplication::Fixed(cfg.replication_factor),
            )
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results =
        block_on(admin.create_topics(missing.iter(), &opts)).map_err(TransportError::Admin)?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(topic = %topic, "kafka topic created"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %topic, "kafka topic already exists")
            }
            Err((topic, code)) => return Err(TransportError::TopicCreate { topic, code }),
        }
    }
    Ok(())
}

/// The partition count of `topic`, asking the broker until it lists the topic with at least one
/// partition (a topic just created may take a moment to show), at most `max_wait`.
///
/// Producers that choose partitions themselves ([`crate::topics::partition_of`]) must use the
/// topic's real count, not the configured one: an existing topic keeps the count it was created
/// with.
pub fn topic_partitions(
    cfg: &KafkaConfig,
    topic: &str,
    max_wait: Duration,
) -> Result<u32, TransportError> {
    let admin: AdminClient<DefaultClientContext> = cfg
        .base_client_config()
        .create()
        .map_err(TransportError::Config)?;
    let start = Instant::now();
    loop {
        let last_error = match admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(2))
        {
            Ok(m) => {
                let n = m
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                if n > 0 {
                    return Ok(n as u32);
                }
                rdkafka::error::KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)
            }
            Err(e) => e,
        };
        if start.elapsed() >= max_wait {
            return Err(TransportError::BrokerUnreachable {
                brokers: cfg.brokers.clone(),
                waited_ms: start.elapsed().as_millis() as u64,
                source: last_error,
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Wakes the thread blocked in [`block_on`].
struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread (the admin futures resolve from rdkafka's own
/// thread; no async runtime is needed for a startup call).
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => thread::park(),
        }
    }
}
