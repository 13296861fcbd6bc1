//! The Kafka consumer thread: records from a consumer group to the owning shards' channels.
//!
//! One OS thread owns one rdkafka `BaseConsumer` (`auto.offset.reset=earliest`, no automatic
//! commit). Each record is copied into an [`InFrame`] and handed to `outputs[route(partition,
//! n)]` with a blocking send: a slow shard stops this thread, which stops fetching, which is
//! the backpressure towards the broker. Offsets are committed (asynchronously, every
//! [`COMMIT_EVERY`] at most, synchronously at stop) only for frames already handed over, so
//! delivery is at-least-once: after a crash or a rebalance some frames come again.
//!
//! Payloads are raw bytes; the receiver validates them with [`crate::decode_counted`], which
//! counts and skips bad frames, so a corrupted record never stops the flow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{SendTimeoutError, Sender};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use super::{KafkaConfig, RecreationCursor, Recreations, TransportError};

/// Offsets are committed at most this often while frames flow.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// One record as consumed: where it came from and its value, copied out of rdkafka's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFrame {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// The default route: partition `p` goes to output `p mod n`.
pub fn route_by_partition(partition: i32, outputs: usize) -> usize {
    partition.max(0) as usize % outputs.max(1)
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    frames: AtomicU64,
    commits: AtomicU64,
    commit_errors: AtomicU64,
    errors: AtomicU64,
    logged_error: AtomicBool,
    /// Partitions sought back to the beginning because their topic was re-created.
    rewinds: AtomicU64,
    /// Set once by [`KafkaConsumer::watch_recreations`].
    recreations: OnceLock<Recreations>,
}

/// A snapshot of the consumer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records handed to the outputs.
    pub frames: u64,
    /// Offset commits issued.
    pub commits: u64,
    /// Offset commits refused (the frames come again: at-least-once).
    pub commit_errors: u64,
    /// Consume and client errors (broker down, transport failures).
    pub errors: u64,
    /// Partitions sought back to their beginning because a keeper re-created their topic.
    pub rewinds: u64,
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %error, reason, "kafka consumer client error");
    }
}

impl ConsumerContext for Ctx {}

/// The handle of a consumer thread; dropping it stops the thread (committing what was handed
/// over).
#[derive(Debug)]
pub struct KafkaConsumer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaConsumer {
    /// Joins consumer group `group_id` on `topics` and starts handing records to `outputs`,
    /// the output for a record chosen by `route(partition, outputs.len())` (taken modulo the
    /// number of outputs). The thread ends when stopped or when every output is closed.
    pub fn start<R>(
        cfg: &KafkaConfig,
        group_id: &str,
        topics: Vec<String>,
        outputs: Vec<Sender<InFrame>>,
        route: R,
    ) -> Result<KafkaConsumer, TransportError>
    where
        R: Fn(i32, usize) -> usize + Send + 'static,
    {
        let (consumer, shared) = create(cfg, group_id)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(TransportError::Subscribe)?;
        spawn(consumer, shared, outputs, route)
    }

    /// Like [`Self::start`], but reads fixed partitions (`(topic, partition)` pairs) with
    /// `assign()` instead of joining the group's rebalancing: each starts at the offset committed
    /// under `group_id` (earliest when none; the beginning when it lies beyond the log's end,
    /// see [`start_offsets`]). A process that owns its partitions (an edge's inbox,
    /// every partition of the presence topic) starts reading at once after a restart, instead of
    /// waiting for the group to expire its previous, killed member (45 s by default).
    pub fn start_assigned<R>(
        cfg: &KafkaConfig,
        group_id: &str,
        partitions: &[(String, i32)],
        outputs: Vec<Sender<InFrame>>,
        route: R,
    ) -> Result<KafkaConsumer, TransportError>
    where
        R: Fn(i32, usize) -> usize + Send + 'static,
    {
        let (consumer, shared) = create(cfg, group_id)?;
        let starts = start_offsets(&consumer, partitions, Duration::from_secs(5));
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for ((topic, partition), start) in partitions.iter().zip(starts) {
            tpl.add_partition_offset(topic, *partition, start)
                .map_err(TransportError::Subscribe)?;
        }
        consumer.assign(&tpl).map_err(TransportError::Subscribe)?;
        spawn(consumer, shared, outputs, route)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ConsumerStats {
        let s = &self.shared;
        ConsumerStats {
            frames: s.frames.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            commit_errors: s.commit_errors.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            rewinds: s.rewinds.load(Ordering::Relaxed),
        }
    }

    /// Watches `recreations` (from the [`super::TopicKeeper`] of the topics read): when one of
    /// the consumed topics is re-created, its partitions are sought to the new log's beginning
    /// (its old positions would skip the records written again up to them). Set once; later
    /// calls are ignored.
    pub fn watch_recreations(&self, recreations: Recreations) {
        let _ = self.shared.recreations.set(recreations);
    }

    /// Stops the thread after its current record, commits what was handed over, and waits.
    pub fn stop(mut self) -> Result<ConsumerStats, TransportError> {
        self.stop_inner()?;
        Ok(self.stats())
    }

    fn stop_inner(&mut self) -> Result<(), TransportError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.stop.store(true, Ordering::Release);
        thread.join().map_err(|_| TransportError::ThreadPanicked)
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Where a consumer of `partitions` (`(topic, partition)`) is to start: at its group's committed
/// offset ([`Offset::Stored`]), except where that offset lies beyond the log's end: then the
/// log was lost and re-created (a memory-storage broker restarted) and the committed offset
/// belongs to the old log, written by a process that still read it. tansu answers a fetch
/// beyond a log's end with nothing (Kafka answers `OFFSET_OUT_OF_RANGE`, which
/// `auto.offset.reset` handles), so the consumer would wait there, deaf to every record written
/// before that offset; such a partition starts at [`Offset::Beginning`] (records read twice
/// are duplicates, which every reader detects by id).
///
/// The log's end: tansu 0.6 reports as high watermark one past the first offset of the log's
/// last record batch, not past its last record, so a committed offset above the high watermark
/// is checked by reading from the watermark's last offset (one fetch: the last batch) to see
/// the last record there. A committed offset at or below the high watermark is followed at once.
/// A lost log refilled up to the committed offset before the restart is not noticed (its first
/// records are skipped). A partition whose offsets or last batch cannot be read within `wait`
/// starts at its committed offset. The records read here are dropped; the consumer is left
/// unassigned.
pub fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
    wait: Duration,
) -> Vec<Offset> {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(tpl, wait).ok();
    // Per partition: the committed offset when it lies above the high watermark, and that
    // watermark.
    let mut above: Vec<Option<(i64, i64)>> = Vec::with_capacity(partitions.len());
    // What was read, for the log line below: (topic, partition, committed, high watermark).
    let mut seen_offsets: Vec<(&str, i32, Option<i64>, Option<i64>)> = Vec::new();
    for (topic, partition) in partitions {
        let c = match committed
            .as_ref()
            .and_then(|l| l.find_partition(topic, *partition))
            .map(|e| e.offset())
        {
            Some(Offset::Offset(c)) if c > 0 => c,
            _ => {
                seen_offsets.push((topic, *partition, None, None));
                above.push(None);
                continue;
            }
        };
        let high = consumer
            .fetch_watermarks(topic, *partition, wait)
            .ok()
            .map(|w| w.1);
        seen_offsets.push((topic, *partition, Some(c), high));
        above.push(match high {
            Some(high) if c > high => Some((c, high)),
            _ => None,
        });
    }
    tracing::info!(
        committed_and_high = ?seen_offsets,
        "start offsets read: (topic, partition, committed offset, high watermark)"
    );
    // The end of each such log: one past the last record of its last batch.
    let mut end: Vec<i64> = above
        .iter()
        .map(|a| a.map_or(0, |(_, h)| h.max(0)))
        .collect();
    let mut probe = TopicPartitionList::with_capacity(partitions.len());
    for ((topic, partition), a) in partitions.iter().zip(&above) {
        if let Some((_, high)) = a {
            if *high > 0
                && probe
                    .add_partition_offset(topic, *partition, Offset::Offset(high - 1))
                    .is_err()
            {
                return vec![Offset::Stored; partitions.len()];
            }
        }
    }
    if probe.count() > 0 {
        if consumer.assign(&probe).is_err() {
            return vec![Offset::Stored; partitions.len()];
        }
        let mut seen = vec![false; partitions.len()];
        let deadline = std::time::Instant::now() + wait;
        let mut quiet_since: Option<std::time::Instant> = None;
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    if let Some(i) = partitions
                        .iter()
                        .position(|(t, p)| t.as_str() == m.topic() && *p == m.partition())
                    {
                        seen[i] = true;
                        end[i] = end[i].max(m.offset() + 1);
                    }
                    quiet_since = None;
                }
                _ => {
                    // Every probed partition answered, and nothing more came for a while.
                    let all = above
                        .iter()
                        .zip(&seen)
                        .all(|(a, s)| !matches!(a, Some((_, h)) if *h > 0) || *s);
                    let since = *quiet_since.get_or_insert_with(std::time::Instant::now);
                    if all && since.elapsed() >= Duration::from_millis(100) {
                        break;
                    }
                }
            }
        }
        let _ = consumer.unassign();
        tracing::info!(
            probed = ?partitions.iter().zip(&above).zip(&end).filter(|((_, a), _)| a.is_some())
                .map(|(((t, p), _), e)| (t.as_str(), *p, *e)).collect::<Vec<_>>(),
            "committed offsets above the high watermark: the logs' ends read (topic, partition, end)"
        );
        for (i, a) in above.iter_mut().enumerate() {
            // No answer from a non-empty log in time: follow the committed offset.
            if matches!(a, Some((_, h)) if *h > 0) && !seen[i] {
                *a = None;
            }
        }
    }
    partitions
        .iter()
        .zip(above)
        .zip(end)
        .map(|(((topic, partition), a), end)| match a {
            Some((c, _)) if c > end => {
                tracing::warn!(
                    topic = %topic,
                    partition,
                    committed = c,
                    end,
                    "committed offset beyond the log's end (the broker lost the log): read from its beginning"
                );
                Offset::Beginning
            }
            _ => Offset::Stored,
        })
        .collect()
}

/// The consumer every mode starts from: offsets kept under `group_id`, committed by hand.
fn create(
    cfg: &KafkaConfig,
    group_id: &str,
) -> Result<(BaseConsumer<Ctx>, Arc<Shared>), TransportError> {
    let shared = Arc::new(Shared::default());
    let consumer: BaseConsumer<Ctx> = cfg
        .base_client_config()
        .set("group.id", group_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .create_with_context(Ctx {
            shared: Arc::clone(&shared),
        })
        .map_err(TransportError::Config)?;
    Ok((consumer, shared))
}

/// Starts the consumer thread.
fn spawn<R>(
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Shared>,
    outputs: Vec<Sender<InFrame>>,
    route: R,
) -> Result<KafkaConsumer, TransportError>
where
    R: Fn(i32, usize) -> usize + Send + 'static,
{
    let thread_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("iris-kafka-consumer".to_owned())
        .spawn(move || run(consumer, thread_shared, outputs, route))
        .map_err(TransportError::Thread)?;
    Ok(KafkaConsumer {
        shared,
        thread: Some(thread),
    })
}

fn run<R>(consumer: BaseConsumer<Ctx>, shared: Arc<Shared>, outputs: Vec<Sender<InFrame>>, route: R)
where
    R: Fn(i32, usize) -> usize,
{
    let n = outputs.len();
    if n == 0 {
        tracing::warn!("kafka consumer started without outputs, stopping");
        return;
    }
    // Next offset to commit for each (topic, partition) handed over since the last commit.
    let mut uncommitted: HashMap<(Arc<str>, i32), i64> = HashMap::new();
    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut cursor: Option<RecreationCursor> = None;
    // Re-created topics whose partitions are still to be sought (a seek can fail while the
    // partition is being fetched again: retried at the next poll).
    let mut rewind: Vec<String> = Vec::new();
    'poll: while !shared.stop.load(Ordering::Acquire) {
        if cursor.is_none() {
            if let Some(w) = shared.recreations.get() {
                let topics = assigned_topics(&consumer);
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                cursor = Some(RecreationCursor::new(w.clone(), &names));
            }
        }
        if let Some(c) = &mut cursor {
            for t in c.take() {
                if !rewind.contains(&t) {
                    rewind.push(t);
                }
            }
        }
        if !rewind.is_empty() {
            uncommitted.retain(|(t, _), _| !rewind.iter().any(|r| **r == **t));
            rewind.retain(|t| !rewind_topic(&consumer, &shared, t));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if !shared.logged_error.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "kafka consume error (logged once, counted after)");
                } else {
                    tracing::debug!(error = %e, "kafka consume error");
                }
            }
            Some(Ok(msg)) => {
                let topic = match topic_names.get(msg.topic()) {
                    Some(t) => Arc::clone(t),
                    None => {
                        let t: Arc<str> = Arc::from(msg.topic());
                        topic_names.insert(msg.topic().to_owned(), Arc::clone(&t));
                        t
                    }
                };
                let mut frame = InFrame {
                    topic: Arc::clone(&topic),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                };
                drop(msg);
                let (partition, offset) = (frame.partition, frame.offset);
                let out = &outputs[route(frame.partition, n) % n];
                loop {
                    match out.send_timeout(frame, Duration::from_millis(100)) {
                        Ok(()) => break,
                        Err(SendTimeoutError::Timeout(f)) => {
                            if shared.stop.load(Ordering::Acquire) {
                                break 'poll;
                            }
                            frame = f;
                        }
                        Err(SendTimeoutError::Disconnected(f)) => {
                            tracing::info!(
                                topic = %f.topic,
                                partition = f.partition,
                                "kafka consumer output closed, stopping"
                            );
                            break 'poll;
                        }
                    }
                }
                shared.frames.fetch_add(1, Ordering::Relaxed);
                uncommitted.insert((topic, partition), offset + 1);
            }
        }
        if !uncommitted.is_empty() && last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &shared, &mut uncommitted, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    if !uncommitted.is_empty() {
        commit(&consumer, &shared, &mut uncommitted, CommitMode::Sync);
    }
}

/// The topics of the consumer's current assignment.
fn assigned_topics(consumer: &BaseConsumer<Ctx>) -> Vec<String> {
    let mut topics: Vec<String> = consumer
        .assignment()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| e.topic().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Ok(sub) = consumer.subscription() {
        topics.extend(sub.elements().iter().map(|e| e.topic().to_owned()));
    }
    topics.sort();
    topics.dedup();
    topics
}

/// Seeks every assigned partition of `topic` to its beginning; `true` when all were sought.
fn rewind_topic(consumer: &BaseConsumer<Ctx>, shared: &Shared, topic: &str) -> bool {
    let Ok(tpl) = consumer.assignment() else {
        return false;
    };
    let mut all = true;
    for e in tpl.elements_for_topic(topic) {
        match consumer.seek(
            topic,
            e.partition(),
            Offset::Beginning,
            Duration::from_secs(1),
        ) {
            Ok(()) => {
                shared.rewinds.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    topic,
                    partition = e.partition(),
                    "topic was re-created, reading it again from its beginning"
                );
            }
            Err(err) => {
                all = false;
                tracing::debug!(topic, partition = e.partition(), error = %err, "seek of a re-created topic failed, retried");
            }
        }
    }
    all
}

fn commit(
    consumer: &BaseConsumer<Ctx>,
    shared: &Shared,
    uncommitted: &mut HashMap<(Arc<str>, i32), i64>,
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::with_capacity(uncommitted.len());
    for ((topic, partition), next) in uncommitted.drain() {
        if let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
            tracing::debug!(error = %e, topic = %topic, partition, "kafka offset not added to commit");
        }
    }
    shared.commits.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = consumer.commit(&tpl, mode) {
        shared.commit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "kafka offset commit refused, frames may come again");
    }
}
