//! The cluster core service: what one `iris-core` process does in a regional cluster.
//!
//! [`CoreService`] consumes the region's deliver topic (`topics::deliver(region)`) in the
//! consumer group `iris-core-{region}` (several processes share its partitions; a partition is
//! a core shard, `topics::partition_of(user)`), and for each record (validated with
//! `decode_counted`; a bad frame is counted, its first occurrence logged, and skipped):
//!
//! - `Deliver`: stored in the [`MessageStore`] (the record of truth until acked), then, if the
//!   recipient's session (Redis, [`SessionReader::get_many`], one pipelined lookup per commit
//!   window) says it is online on an edge of this region, the same `Deliver` frame is produced
//!   to that edge's inbox `topics::edge_inbox(region, node)`. Offline (or no session, or a
//!   session in another region, or Redis unreachable): it stays stored for the next login.
//! - `Ack`: the message is deleted; an ack inside the same commit window also cancels the
//!   pending insert (the message is never written, and not routed).
//! - `DrainRequest`: answered with one `DrainChunk` (messages with `id > after` in id order, at
//!   most `min(limit, MAX_DRAIN_CHUNK)`, `more` when more are stored) on the requesting edge's
//!   inbox (`node` of the request).
//! - `Presence`: nothing to store (edges consume presence themselves): counted and ignored, as
//!   are relays, chunks and routes (not core-bound on this topic).
//!
//! **Edge inbox partition.** Everything the core produces to an edge inbox goes to partition 0:
//! one edge consumes its whole inbox and hands each frame to the shard it names (a chunk carries
//! `shard`, a deliver is owned by `partition_of(recipient, shards)`), and one partition keeps
//! the core's frames for that edge in the order the core decided them.
//!
//! **Ordering.** A user's `Deliver`, `Ack` and `DrainRequest` frames all land on the user's one
//! partition, and the service handles a partition's records one at a time in offset order. So
//! when a drain request is handled every earlier deliver and ack of that user has been applied:
//! the pending window is written to the store (not yet fsynced) before the scan, and the chunk
//! is produced only after the window's durable commit, like everything else.
//!
//! **Group commit and durability.** Records are applied to an in-memory window; at the end of
//! the commit window (`commit_window`, 2 ms by default, measured from the first record of the
//! window) or after `max_batch` records the window is written as one atomic batch and the
//! journal fsynced. Only then are the window's outputs (routed delivers, drain chunks) handed to
//! the producer, and only then are the consumed offsets committed. So a crash (kill -9) loses
//! nothing the store acknowledged: records after the last committed offset are consumed again,
//! which may store or route a message twice (at-least-once; ids make duplicates detectable),
//! never lose one. Outputs handed to the producer but not yet acknowledged by the broker at a
//! crash are lost; the messages they carried stay stored and come with the next drain.
//! A failed store commit stops the service with an error, offsets uncommitted.
//!
//! **Limits.** The embedded store lives on this process's disk: when a partition moves to
//! another process (rebalance), that process does not see the messages stored here. Fixed
//! partition ownership (one process per partition set, or the later shared Scylla store) is
//! required in production; the group handles failover of consumption only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iris_bus::kafka::{ensure_topics, KafkaConfig, KafkaProducer, OutFrame, ProducerRing};
use iris_bus::{
    decode_counted, encode, to_owned, BusFrame, Deliver, DrainChunk, DrainRequest, Drained,
    FrameCounts, FrameStats,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::api::StoredMsg;
use crate::error::CoreError;
use crate::sessions::{SessionConfig, SessionReader};
use crate::store::{Batch, MessageStore};

/// The most messages one `DrainChunk` carries, whatever the request's `limit` (keeps a chunk
/// well under the broker's default 1 MB record limit for small messages).
pub const MAX_DRAIN_CHUNK: usize = 1000;

/// Everything the service needs to run.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Kafka bootstrap servers, `host:port[,...]`.
    pub brokers: String,
    /// Redis URL of the session store, `redis://host:port`.
    pub redis_url: String,
    /// This region's name (`topics::is_valid_region`).
    pub region: String,
    /// Directory of the message store.
    pub data_dir: PathBuf,
    /// Partitions of the deliver and presence topics when this process creates them.
    pub partitions: u32,
    /// Consumer group id (`iris-core-{region}` by default).
    pub group: String,
    /// Group commit window: records are made durable at most this long after the first one.
    pub commit_window: Duration,
    /// A window is committed early once it holds this many records.
    pub max_batch: usize,
    /// Kafka `session.timeout.ms`: how long the group waits for a silent (killed) member
    /// before its partitions move to the others, and before a restarted member gets them back.
    pub session_timeout: Duration,
}

impl ServiceConfig {
    /// A configuration with the defaults: 16 partitions, group `iris-core-{region}`, a 2 ms
    /// commit window, 4096 records per window at most, a 6 s group session timeout.
    pub fn new(
        brokers: impl Into<String>,
        redis_url: impl Into<String>,
        region: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        let region = region.into();
        ServiceConfig {
            brokers: brokers.into(),
            redis_url: redis_url.into(),
            group: format!("iris-core-{region}"),
            region,
            data_dir: data_dir.into(),
            partitions: 16,
            commit_window: Duration::from_millis(2),
            max_batch: 4096,
            session_timeout: Duration::from_secs(6),
        }
    }
}

/// Counters of the service (monotonic).
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Records consumed (good or bad).
    pub records: AtomicU64,
    /// Deliver frames handled.
    pub delivers: AtomicU64,
    /// Ack frames handled.
    pub acks: AtomicU64,
    /// Acks that cancelled an insert of the same window.
    pub cancelled: AtomicU64,
    /// Drain requests answered.
    pub drains: AtomicU64,
    /// Presence frames seen (ignored).
    pub presence: AtomicU64,
    /// Other frames seen on the deliver topic (ignored).
    pub ignored: AtomicU64,
    /// Delivers produced to an edge inbox.
    pub routed: AtomicU64,
    /// Delivers kept for the next login (recipient offline or unknown).
    pub offline: AtomicU64,
    /// Durable store commits.
    pub commits: AtomicU64,
    /// Session lookups that failed (the messages stayed stored, unrouted).
    pub session_errors: AtomicU64,
}

/// One output decided inside a window, produced after its durable commit.
enum Output {
    /// A stored message to route if its recipient is online.
    Route(Deliver),
    /// An encoded frame for an edge inbox (drain chunk).
    Frame {
        node: u32,
        key: Vec<u8>,
        payload: Vec<u8>,
    },
}

/// The records applied since the last durable commit.
#[derive(Default)]
struct Window {
    started: Option<Instant>,
    records: usize,
    /// Inserts not yet written, by `(recipient, id)`.
    inserts: BTreeMap<(Vec<u8>, u64), StoredMsg>,
    /// Deletes not yet written.
    deletes: Vec<(Vec<u8>, u64)>,
    /// Messages acked in this window (not routed even if delivered in it).
    acked: HashSet<(Vec<u8>, u64)>,
    outputs: Vec<Output>,
    /// Next offset to commit per partition.
    offsets: HashMap<i32, i64>,
}

/// The running core service: consumer, producer, store and session reader.
pub struct CoreService {
    cfg: ServiceConfig,
    deliver_topic: String,
    consumer: BaseConsumer,
    producer: Option<KafkaProducer>,
    ring: ProducerRing,
    store: MessageStore,
    sessions: SessionReader,
    frames: FrameStats,
    stats: Arc<ServiceStats>,
    window: Window,
    logged_consume_error: bool,
    logged_session_error: bool,
}

impl std::fmt::Debug for CoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreService")
            .field("region", &self.cfg.region)
            .field("group", &self.cfg.group)
            .finish_non_exhaustive()
    }
}

impl CoreService {
    /// Creates the missing topics (deliver and presence, `partitions` each), opens the store,
    /// starts the producer and subscribes the consumer. Consumption starts with [`Self::run`].
    pub fn start(cfg: ServiceConfig) -> Result<Self, CoreError> {
        if !iris_bus::topics::is_valid_region(&cfg.region) {
            return Err(CoreError::InvalidInput(format!(
                "invalid region name {:?}",
                cfg.region
            )));
        }
        let kafka = KafkaConfig {
            brokers: cfg.brokers.clone(),
            client_id: format!("iris-core-{}", cfg.region),
            linger_ms: 1,
            ..KafkaConfig::default()
        };
        let parts = cfg.partitions.max(1) as i32;
        let deliver_topic = iris_bus::topics::deliver(&cfg.region);
        ensure_topics(
            &kafka,
            &[
                (deliver_topic.clone(), parts),
                (iris_bus::topics::presence(&cfg.region), parts),
            ],
        )?;
        let store = MessageStore::open(&cfg.data_dir)?;
        let sessions = SessionReader::new(&SessionConfig::with_url(cfg.redis_url.clone()))?;
        let (producer, mut rings) = KafkaProducer::start(&kafka, 1)?;
        let ring = rings.pop().ok_or(CoreError::ThreadPanicked)?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("client.id", format!("iris-core-{}", cfg.region))
            .set("group.id", &cfg.group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                cfg.session_timeout.as_millis().max(1).to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (cfg.session_timeout.as_millis() / 3).max(1).to_string(),
            )
            .set("log_level", "3")
            .create()?;
        consumer.subscribe(&[deliver_topic.as_str()])?;
        info!(region = %cfg.region, group = %cfg.group, topic = %deliver_topic, "iris-core subscribed");
        Ok(CoreService {
            cfg,
            deliver_topic,
            consumer,
            producer: Some(producer),
            ring,
            store,
            sessions,
            frames: FrameStats::new(),
            stats: Arc::new(ServiceStats::default()),
            window: Window::default(),
            logged_consume_error: false,
            logged_session_error: false,
        })
    }

    /// The service's counters.
    pub fn stats(&self) -> &Arc<ServiceStats> {
        &self.stats
    }

    /// Decode outcomes of the consumed records (bad frames are `invalid`/`unknown_version`).
    pub fn frame_counts(&self) -> FrameCounts {
        self.frames.counts()
    }

    /// Consumes until `stop` is set, then commits the last window durably, produces its
    /// outputs, commits its offsets synchronously and flushes the producer (at most 5 s).
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), CoreError> {
        while !stop.load(Ordering::Acquire) {
            let timeout = match self.window.started {
                Some(t) => self.cfg.commit_window.saturating_sub(t.elapsed()),
                None => Duration::from_millis(100),
            };
            match self.consumer.poll(timeout) {
                None => {}
                Some(Err(e)) => {
                    if !self.logged_consume_error {
                        self.logged_consume_error = true;
                        warn!(error = %e, "kafka consume error (logged once)");
                    } else {
                        debug!(error = %e, "kafka consume error");
                    }
                }
                Some(Ok(msg)) => {
                    let (partition, offset) = (msg.partition(), msg.offset());
                    // Copied out: the record borrows the consumer, the handler needs `self`.
                    let payload = msg.payload().unwrap_or_default().to_vec();
                    drop(msg);
                    self.window.started.get_or_insert_with(Instant::now);
                    self.handle(&payload)?;
                    self.window.records += 1;
                    self.window.offsets.insert(partition, offset + 1);
                }
            }
            let due = self
                .window
                .started
                .is_some_and(|t| t.elapsed() >= self.cfg.commit_window);
            if due || self.window.records >= self.cfg.max_batch {
                self.flush(CommitMode::Async)?;
            }
        }
        self.flush(CommitMode::Sync)?;
        if let Some(p) = self.producer.take() {
            match p.flush_and_stop(Duration::from_secs(5)) {
                Ok(s) => debug!(produced = s.produced_ok, "kafka producer flushed"),
                Err(e) => {
                    warn!(error = %e, "kafka producer not flushed at shutdown; the messages stay stored")
                }
            }
        }
        let s = &self.stats;
        let f = self.frames.counts();
        info!(
            records = s.records.load(Ordering::Relaxed),
            delivers = s.delivers.load(Ordering::Relaxed),
            acks = s.acks.load(Ordering::Relaxed),
            drains = s.drains.load(Ordering::Relaxed),
            routed = s.routed.load(Ordering::Relaxed),
            bad_frames = f.invalid + f.unknown_version,
            "iris-core stopped"
        );
        Ok(())
    }

    /// Applies one record to the window.
    fn handle(&mut self, payload: &[u8]) -> Result<(), CoreError> {
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        // decode_counted counts the failure and logs its first occurrence.
        let Ok(archived) = decode_counted(&self.frames, payload) else {
            return Ok(());
        };
        let frame = match to_owned(archived) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "bus frame not deserialized, skipped");
                return Ok(());
            }
        };
        match frame {
            BusFrame::Deliver(d) => {
                self.stats.delivers.fetch_add(1, Ordering::Relaxed);
                let key = (d.recipient.clone(), d.id);
                self.window.acked.remove(&key);
                self.window.inserts.insert(
                    key,
                    StoredMsg {
                        id: d.id,
                        recipient: d.recipient.clone(),
                        sender: d.sender.clone(),
                        payload: d.payload.clone(),
                    },
                );
                self.window.outputs.push(Output::Route(d));
            }
            BusFrame::Ack(a) => {
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                let key = (a.user, a.id);
                if self.window.inserts.remove(&key).is_some() {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                // Always delete too: a redelivered message may already be in the store.
                self.window.deletes.push(key.clone());
                self.window.acked.insert(key);
            }
            BusFrame::DrainRequest(r) => self.drain(r)?,
            BusFrame::Presence(_) => {
                self.stats.presence.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(
                    kind = other.kind().name(),
                    "frame not for the core, ignored"
                );
            }
        }
        Ok(())
    }

    /// Writes the pending window (not fsynced), so a scan sees every earlier record.
    fn write_pending(&mut self) -> Result<(), CoreError> {
        let inserts: Vec<StoredMsg> = std::mem::take(&mut self.window.inserts)
            .into_values()
            .collect();
        let deletes = std::mem::take(&mut self.window.deletes);
        self.store.write(
            &Batch {
                inserts: &inserts,
                deletes: &deletes,
                ..Batch::default()
            },
            false,
        )
    }

    fn drain(&mut self, r: DrainRequest) -> Result<(), CoreError> {
        self.stats.drains.fetch_add(1, Ordering::Relaxed);
        self.write_pending()?;
        let limit = (r.limit as usize).min(MAX_DRAIN_CHUNK);
        let mut msgs = self
            .store
            .scan_messages(&r.user, r.after, limit.saturating_add(1))?;
        let more = msgs.len() > limit;
        msgs.truncate(limit);
        debug!(node = r.node, messages = msgs.len(), more, "drain answered");
        let chunk = BusFrame::DrainChunk(DrainChunk {
            user: r.user.clone(),
            node: r.node,
            shard: r.shard,
            conn: r.conn,
            messages: msgs
                .into_iter()
                .map(|m| Drained {
                    id: m.id,
                    sender: m.sender,
                    payload: m.payload,
                })
                .collect(),
            more,
        });
        let payload = encode(&chunk).map_err(CoreError::Encode)?;
        self.window.outputs.push(Output::Frame {
            node: r.node,
            key: r.user,
            payload,
        });
        Ok(())
    }

    /// Commits the window durably, then produces its outputs, then commits its offsets.
    fn flush(&mut self, mode: CommitMode) -> Result<(), CoreError> {
        if self.window.started.is_none() && self.window.offsets.is_empty() {
            return Ok(());
        }
        self.write_pending()?;
        self.store.write(&Batch::default(), true)?;
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let window = std::mem::take(&mut self.window);
        self.produce_outputs(window.outputs, &window.acked);
        if !window.offsets.is_empty() {
            let mut tpl = TopicPartitionList::with_capacity(window.offsets.len());
            for (partition, next) in &window.offsets {
                tpl.add_partition_offset(&self.deliver_topic, *partition, Offset::Offset(*next))?;
            }
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                // The records come again (at-least-once); after a rebalance this is expected.
                debug!(error = %e, "kafka offset commit refused, records may come again");
                if matches!(mode, CommitMode::Sync) {
                    warn!(error = %e, "final offset commit refused, records will come again");
                }
            }
        }
        Ok(())
    }

    fn produce_outputs(&mut self, outputs: Vec<Output>, acked: &HashSet<(Vec<u8>, u64)>) {
        if outputs.is_empty() {
            return;
        }
        // One pipelined session lookup for every recipient to route.
        let mut users: Vec<&[u8]> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::Route(d) if !acked.contains(&(d.recipient.clone(), d.id)) => {
                    Some(d.recipient.as_slice())
                }
                _ => None,
            })
            .collect();
        users.sort_unstable();
        users.dedup();
        let mut nodes: HashMap<Vec<u8>, u32> = HashMap::new();
        match self.sessions.get_many(&users) {
            Ok(records) => {
                for (u, rec) in users.iter().zip(records) {
                    let Some(rec) = rec else { continue };
                    if !rec.online || rec.region != self.cfg.region {
                        continue;
                    }
                    match rec.node.parse::<u32>() {
                        Ok(n) => {
                            nodes.insert(u.to_vec(), n);
                        }
                        Err(_) => {
                            debug!(node = %rec.node, "session node is not a node id, kept offline")
                        }
                    }
                }
            }
            Err(e) => {
                self.stats.session_errors.fetch_add(1, Ordering::Relaxed);
                if !self.logged_session_error {
                    self.logged_session_error = true;
                    warn!(error = %e, "session lookup failed, messages kept for the next login (logged once)");
                } else {
                    debug!(error = %e, "session lookup failed");
                }
            }
        }
        for o in outputs {
            let (node, key, payload) = match o {
                Output::Route(d) => {
                    if acked.contains(&(d.recipient.clone(), d.id)) {
                        continue;
                    }
                    let Some(&node) = nodes.get(&d.recipient) else {
                        self.stats.offline.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let key = d.recipient.clone();
                    match encode(&BusFrame::Deliver(d)) {
                        Ok(p) => {
                            self.stats.routed.fetch_add(1, Ordering::Relaxed);
                            (node, key, p)
                        }
                        Err(e) => {
                            warn!(error = %e, "deliver not encoded, kept for the next login");
                            continue;
                        }
                    }
                }
                Output::Frame { node, key, payload } => (node, key, payload),
            };
            self.send(OutFrame {
                topic: Arc::from(iris_bus::topics::edge_inbox(&self.cfg.region, node)),
                partition: 0,
                key: Some(key),
                payload,
            });
        }
    }

    /// Hands `frame` to the producer, waiting while its ring is full (broker slow or down):
    /// the backpressure that stops consumption.
    fn send(&self, mut frame: OutFrame) {
        let mut waited = false;
        loop {
            match self.ring.try_send(frame) {
                Ok(()) => return,
                Err(f) => {
                    if !waited {
                        waited = true;
                        debug!("producer ring full, waiting");
                    }
                    frame = f;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
}
