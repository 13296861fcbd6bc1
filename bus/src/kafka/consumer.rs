//! The Kafka consumer thread: records from a consumer group to the owning shards' channels.
//!
//! One OS thread owns one rdkafka `BaseConsumer` (`auto.offset.reset=earliest`, no automatic
//! commit). Each record is copied into an [`InFrame`] and handed to `outputs[route(partition,
//! n)]` with a blocking send: a slow shard stops this thread, which stops fetching, which is
//! the backpressure towards the broker. Offsets are committed (asynchronously, every
//! [`COMMIT_EVERY`] at most, synchronously at stop) only for frames already handed over, so
//! delivery is at-least-once: after a crash or a rebalance some frames come again.
//!
//! A consumer of fixed partitions ([`KafkaConsumer::start_assigned`], and the core's and the
//! importer's own consumers) starts where [`start_offsets`] says, and its [`OffsetGuard`] holds it
//! there against a broker (tansu 0.6) that answers a fetch from inside a record batch with the
//! next batch.
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
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use super::keeper::{payload_hash, Mark};
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
    /// Partitions sought back by the [`OffsetGuard`].
    batch_seeks: AtomicU64,
    /// Records dropped as repeats by the [`OffsetGuard`].
    repeats: AtomicU64,
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
    /// Partitions sought back to an earlier batch because the broker answered the first fetch
    /// from past the committed offset ([`OffsetGuard`]).
    pub batch_seeks: u64,
    /// Records the broker sent again in the same pass, dropped ([`OffsetGuard`]).
    pub repeats: u64,
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
        spawn(consumer, shared, outputs, route, OffsetGuard::default())
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
        for ((topic, partition), start) in partitions.iter().zip(starts.offsets) {
            tpl.add_partition_offset(topic, *partition, start)
                .map_err(TransportError::Subscribe)?;
        }
        consumer.assign(&tpl).map_err(TransportError::Subscribe)?;
        spawn(consumer, shared, outputs, route, starts.guard)
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
            batch_seeks: s.batch_seeks.load(Ordering::Relaxed),
            repeats: s.repeats.load(Ordering::Relaxed),
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
///
/// With the offsets comes the [`OffsetGuard`] that holds the consumer to them: a partition with
/// a committed offset above zero starts a little before it, and is watched until it reaches it.
pub fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
    wait: Duration,
) -> Starts {
    let starts = stored_or_beginning(consumer, partitions, wait);
    let mut guard = OffsetGuard::default();
    let offsets = partitions
        .iter()
        .zip(starts)
        .map(
            |((topic, partition), (offset, committed, high))| match (offset, committed) {
                (Offset::Stored, Some(c)) => guard.watch(topic, *partition, c, high),
                (offset, _) => offset,
            },
        )
        .collect();
    Starts { offsets, guard }
}

/// [`start_offsets`] without the guard: per partition, where to start, and the committed
/// offset (when above zero) and high watermark read.
fn stored_or_beginning<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
    wait: Duration,
) -> Vec<(Offset, Option<i64>, Option<i64>)> {
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
    // The partitions to probe: a committed offset above a watermark above zero.
    let probed: Vec<(usize, (&str, i32, i64))> = partitions
        .iter()
        .zip(&above)
        .enumerate()
        .filter_map(|(i, ((topic, partition), a))| match a {
            Some((_, high)) if *high > 0 => Some((i, (topic.as_str(), *partition, *high))),
            _ => None,
        })
        .collect();
    if !probed.is_empty() {
        let parts: Vec<(&str, i32, i64)> = probed.iter().map(|&(_, p)| p).collect();
        let Some(batches) = read_last_batches(consumer, &parts, wait) else {
            return stored(&seen_offsets);
        };
        let mut seen = vec![false; partitions.len()];
        for (&(i, _), batch) in probed.iter().zip(&batches) {
            if let Some(records) = batch {
                seen[i] = true;
                for r in records {
                    end[i] = end[i].max(r.offset + 1);
                }
            }
        }
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
        .zip(&seen_offsets)
        .map(|((((topic, partition), a), end), seen)| match a {
            Some((c, _)) if c > end => {
                tracing::warn!(
                    topic = %topic,
                    partition,
                    committed = c,
                    end,
                    "committed offset beyond the log's end (the broker lost the log): read from its beginning"
                );
                (Offset::Beginning, None, None)
            }
            _ => (Offset::Stored, seen.2, seen.3),
        })
        .collect()
}

/// Every partition at its committed offset (as read into `seen`).
fn stored(
    seen: &[(&str, i32, Option<i64>, Option<i64>)],
) -> Vec<(Offset, Option<i64>, Option<i64>)> {
    seen.iter().map(|s| (Offset::Stored, s.2, s.3)).collect()
}

/// Reads the last record batch of each `(topic, partition, high watermark)` (watermarks above
/// zero) with `consumer`: from `high - 1`, which is tansu 0.6's first offset of the last batch
/// (its high watermark is one past that) and Kafka's last record, until every partition answered
/// and nothing more came for 100 ms, at most `wait`. Per partition, the records read (`None`: no
/// answer in time); `None` when the consumer could not be assigned. Leaves it unassigned.
pub(crate) fn read_last_batches<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[(&str, i32, i64)],
    wait: Duration,
) -> Option<Vec<Option<Vec<Mark>>>> {
    let mut tpl = TopicPartitionList::with_capacity(parts.len());
    for &(topic, partition, high) in parts {
        tpl.add_partition_offset(topic, partition, Offset::Offset(high - 1))
            .ok()?;
    }
    consumer.assign(&tpl).ok()?;
    let mut out: Vec<Option<Vec<Mark>>> = vec![None; parts.len()];
    let deadline = Instant::now() + wait;
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                if let Some(i) = parts
                    .iter()
                    .position(|&(t, p, _)| t == m.topic() && p == m.partition())
                {
                    out[i].get_or_insert_with(Vec::new).push(Mark {
                        offset: m.offset(),
                        timestamp: m.timestamp().to_millis().unwrap_or(-1),
                        hash: payload_hash(m.payload().unwrap_or_default()),
                    });
                }
                quiet_since = None;
            }
            _ => {
                // Every partition answered, and nothing more came for a while.
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if out.iter().all(Option::is_some) && since.elapsed() >= Duration::from_millis(100)
                {
                    break;
                }
            }
        }
    }
    let _ = consumer.unassign();
    Some(out)
}

/// Where each partition starts ([`start_offsets`]), in the order asked, and the guard that
/// holds the consumer to those starts.
#[derive(Debug)]
pub struct Starts {
    pub offsets: Vec<Offset>,
    pub guard: OffsetGuard,
}

/// The first back step of an [`OffsetGuard`], in offsets; each further step is four times the
/// last.
pub const FIRST_BACK_STEP: i64 = 256;

/// How long an [`OffsetGuard`]'s seek may take.
const SEEK_WAIT: Duration = Duration::from_secs(2);

/// Holds a consumer to the records it is owed: from the committed offset it started at, each
/// once, in order. Two faults of tansu 0.6 are mended here (docs/BUS.md, "tansu's fetch from
/// inside a batch").
///
/// **A fetch from inside a record batch is answered with the next batch.** Kafka answers a fetch
/// from offset `o` with the batch that holds `o`, and librdkafka drops the records before `o`.
/// tansu answers with the first batch whose base offset is at or after `o`: a consumer restarted
/// at its committed offset (one past the last record handled, usually inside a batch) would skip
/// the rest of that batch, records that nobody handled. So each partition with a committed
/// offset above zero starts [`FIRST_BACK_STEP`] offsets earlier ([`Self::watch`]), and the
/// records before the committed offset (handled already) are dropped. When the first record
/// still lies past the committed offset, the batch holding it began earlier: the partition is
/// sought back four times further, and again, down to offset 0. Starting early rather than
/// waiting to see a skip matters when the committed offset lies in the log's last batch: tansu
/// answers that fetch with nothing until another batch is written. So the start is also no
/// later than the last batch's first offset, which tansu's high watermark gives.
///
/// **A fetch from inside a large batch may carry the log's last batch several times** (six
/// copies in one response, measured). So every record below the next offset of its partition is
/// dropped as a repeat, except after an automatic offset reset ([`Self::on_error`]), where the
/// log itself went back.
///
/// Against Kafka a start costs [`FIRST_BACK_STEP`] records read and dropped, nothing is sought
/// and nothing repeats.
#[derive(Debug, Default)]
pub struct OffsetGuard {
    parts: Vec<Part>,
    seeks: u64,
    repeats: u64,
    /// What [`Self::take_counts`] already reported.
    reported: (u64, u64),
}

#[derive(Debug)]
struct Part {
    topic: String,
    partition: i32,
    /// One past the last record taken (-1: none yet).
    next: i64,
    /// Set until the committed offset is reached.
    watch: Option<Watch>,
}

#[derive(Debug, Clone, Copy)]
struct Watch {
    /// The committed offset: the first record to hand over.
    start: i64,
    /// The offset the partition was last assigned or sought to.
    tried: i64,
    /// A record before `start` came: the fetch began in time, the rest follows in order.
    reached: bool,
}

/// What to do with a record, by [`OffsetGuard::verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it over.
    Take,
    /// Handled already (before the committed offset, or a repeat): drop it.
    Drop,
    /// Drop it and seek the partition back to this offset (the batch holding the committed
    /// offset was skipped).
    SeekTo(i64),
}

impl OffsetGuard {
    /// Watches `(topic, partition)`, to be read from committed offset `start`, and returns the
    /// offset to assign it at: [`FIRST_BACK_STEP`] earlier, and no later than the first offset
    /// of the log's last batch when the high watermark `high` is known (tansu reports that
    /// offset plus one), so that the first fetch always finds a batch. A start of zero needs no
    /// watch: no batch begins before it.
    pub fn watch(&mut self, topic: &str, partition: i32, start: i64, high: Option<i64>) -> Offset {
        let from = (start - FIRST_BACK_STEP)
            .min(high.map_or(i64::MAX, |h| h - 1))
            .max(0);
        let watch = (start > 0).then_some(Watch {
            start,
            tried: from,
            reached: false,
        });
        let i = self.part(topic, partition);
        self.parts[i] = Part {
            topic: topic.to_owned(),
            partition,
            next: -1,
            watch,
        };
        Offset::Offset(from)
    }

    /// Forgets every partition of `topic` (sought elsewhere: a re-created topic is read from its
    /// beginning).
    pub fn forget_topic(&mut self, topic: &str) {
        self.parts.retain(|p| p.topic != topic);
    }

    /// Partitions sought back so far.
    pub fn seeks(&self) -> u64 {
        self.seeks
    }

    /// Records dropped as repeats so far.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    /// Seeks and repeats since the last call: `(seeks, repeats)`, for counters that outlive
    /// this guard (an importer that connects again starts a new one).
    pub fn take_counts(&mut self) -> (u64, u64) {
        let new = (self.seeks - self.reported.0, self.repeats - self.reported.1);
        self.reported = (self.seeks, self.repeats);
        new
    }

    /// The index of `(topic, partition)`, added when new.
    fn part(&mut self, topic: &str, partition: i32) -> usize {
        match self
            .parts
            .iter()
            .position(|p| p.partition == partition && p.topic == topic)
        {
            Some(i) => i,
            None => {
                self.parts.push(Part {
                    topic: topic.to_owned(),
                    partition,
                    next: -1,
                    watch: None,
                });
                self.parts.len() - 1
            }
        }
    }

    /// What to do with the record at `offset` of `(topic, partition)`; a [`Verdict::SeekTo`]
    /// is counted as sought (when the seek then fails, [`Self::admit`] gives the watch up).
    pub fn verdict(&mut self, topic: &str, partition: i32, offset: i64) -> Verdict {
        let i = self.part(topic, partition);
        let p = &mut self.parts[i];
        let Some(w) = &mut p.watch else {
            if offset < p.next {
                self.repeats += 1;
                return Verdict::Drop;
            }
            p.next = offset + 1;
            return Verdict::Take;
        };
        if offset < w.start {
            w.reached = true;
            return Verdict::Drop;
        }
        if offset == w.start || w.reached || w.tried == 0 {
            // In order from the committed offset, or past a gap the log really has.
            p.watch = None;
            p.next = offset + 1;
            return Verdict::Take;
        }
        let to = (w.start - (w.start - w.tried).max(1).saturating_mul(4)).max(0);
        w.tried = to;
        self.seeks += 1;
        Verdict::SeekTo(to)
    }

    /// Takes a consume error: after an automatic offset reset (the broker answered
    /// `OFFSET_OUT_OF_RANGE`: a log truncated or re-created under the consumer), a partition may
    /// go back to offsets below what was taken, and those records are new: no record is dropped
    /// as a repeat until each partition takes a record again. (The error does not name its
    /// partition, so every partition's position is forgotten.)
    pub fn on_error(&mut self, e: &KafkaError) {
        if matches!(
            e,
            KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)
        ) {
            for p in &mut self.parts {
                p.next = -1;
            }
        }
    }

    /// The seek asked by the last [`Verdict::SeekTo`] of `(topic, partition)` failed: stop
    /// watching it and take the record at `offset` (the records come as they come, as without
    /// a watch; repeats are still dropped).
    fn give_up(&mut self, topic: &str, partition: i32, offset: i64) {
        let i = self.part(topic, partition);
        self.parts[i].watch = None;
        self.parts[i].next = offset + 1;
    }

    /// [`Self::admit`] for a record `consumer` just returned, adding the seeks and repeats it
    /// caused to the counters `seeks` and `repeats`.
    pub fn admit_counted<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        msg: &BorrowedMessage<'_>,
        seeks: &AtomicU64,
        repeats: &AtomicU64,
    ) -> bool {
        let take = self.admit(consumer, msg.topic(), msg.partition(), msg.offset());
        let (s, r) = self.take_counts();
        if s + r > 0 {
            seeks.fetch_add(s, Ordering::Relaxed);
            repeats.fetch_add(r, Ordering::Relaxed);
        }
        take
    }

    /// [`Self::verdict`] for a record `consumer` just returned, with the seek done: `true` to
    /// hand the record over, `false` to drop it. A failed seek is logged and the record taken.
    pub fn admit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> bool {
        match self.verdict(topic, partition, offset) {
            Verdict::Take => true,
            Verdict::Drop => false,
            Verdict::SeekTo(to) => {
                match consumer.seek(topic, partition, Offset::Offset(to), SEEK_WAIT) {
                    Ok(()) => {
                        tracing::info!(
                            topic,
                            partition,
                            first = offset,
                            from = to,
                            "the broker answered from past the committed offset (a fetch from inside a record batch): reading again from an earlier offset"
                        );
                        false
                    }
                    Err(e) => {
                        tracing::warn!(
                            topic,
                            partition,
                            first = offset,
                            error = %e,
                            "seek back to the committed offset's batch failed: records before this one may be skipped"
                        );
                        self.give_up(topic, partition, offset);
                        true
                    }
                }
            }
        }
    }
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
    guard: OffsetGuard,
) -> Result<KafkaConsumer, TransportError>
where
    R: Fn(i32, usize) -> usize + Send + 'static,
{
    let thread_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("iris-kafka-consumer".to_owned())
        .spawn(move || run(consumer, thread_shared, outputs, route, guard))
        .map_err(TransportError::Thread)?;
    Ok(KafkaConsumer {
        shared,
        thread: Some(thread),
    })
}

fn run<R>(
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Shared>,
    outputs: Vec<Sender<InFrame>>,
    route: R,
    mut guard: OffsetGuard,
) where
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
            for t in &rewind {
                guard.forget_topic(t);
            }
            uncommitted.retain(|(t, _), _| !rewind.iter().any(|r| **r == **t));
            rewind.retain(|t| !rewind_topic(&consumer, &shared, t));
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => {
                guard.on_error(&e);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if !shared.logged_error.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "kafka consume error (logged once, counted after)");
                } else {
                    tracing::debug!(error = %e, "kafka consume error");
                }
            }
            Some(Ok(msg))
                if !guard.admit_counted(&consumer, &msg, &shared.batch_seeks, &shared.repeats) =>
            {
                // Handed over before this start, a repeat, or sought back to an earlier batch.
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A broker's log as record batches: `(base offset, records)`, contiguous from 0.
    fn log_of(sizes: &[i64]) -> Vec<(i64, i64)> {
        let mut base = 0;
        sizes
            .iter()
            .map(|&n| {
                let b = (base, n);
                base += n;
                b
            })
            .collect()
    }

    /// What a tansu-0.6-like broker answers to a fetch from `from`: every batch whose base is at
    /// or after `from`, the last one repeated `repeats` times when `from` lies inside an
    /// earlier batch; and the client drops the records below `from`, as librdkafka does.
    fn fetch(log: &[(i64, i64)], from: i64, kafka: bool, repeats: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let inside = log.iter().any(|&(b, n)| b < from && from < b + n);
        for &(b, n) in log {
            if b >= from || (kafka && from < b + n) {
                out.extend(b..b + n);
            }
        }
        if inside && !kafka {
            if let Some(&(b, n)) = log.last() {
                for _ in 0..repeats {
                    out.extend(b..b + n);
                }
            }
        }
        out.retain(|&o| o >= from);
        out
    }

    /// Runs a guarded consumer of the log from committed offset `c`: returns the records taken
    /// and the guard.
    fn consume(log: &[(i64, i64)], c: i64, kafka: bool, repeats: usize) -> (Vec<i64>, OffsetGuard) {
        let mut g = OffsetGuard::default();
        // tansu's high watermark: one past the last batch's base; Kafka's: the log's end.
        let high = match (kafka, log.last()) {
            (true, Some(&(b, n))) => b + n,
            (false, Some(&(b, _))) => b + 1,
            (_, None) => 0,
        };
        let Offset::Offset(mut from) = g.watch("t", 0, c, Some(high)) else {
            unreachable!("watch returns an offset")
        };
        let mut taken = Vec::new();
        // Each pass is one fetch from `from` to the log's end; a seek starts another.
        for _ in 0..64 {
            let mut sought = None;
            for o in fetch(log, from, kafka, repeats) {
                match g.verdict("t", 0, o) {
                    Verdict::Take => taken.push(o),
                    Verdict::Drop => {}
                    Verdict::SeekTo(to) => {
                        sought = Some(to);
                        break;
                    }
                }
            }
            match sought {
                Some(to) => from = to,
                None => return (taken, g),
            }
        }
        panic!("the guard kept seeking");
    }

    #[test]
    fn a_committed_offset_inside_a_batch_is_reached_by_starting_earlier() {
        // Batches of 40: a start at 20 - 256 = 0 reads the first batch, no seek.
        let log = log_of(&[40; 15]);
        let (taken, g) = consume(&log, 20, false, 0);
        assert_eq!(taken, (20..600).collect::<Vec<_>>());
        assert_eq!((g.seeks(), g.repeats()), (0, 0));
    }

    /// The log of the integration test: 15 batches of 40, one of 1,000 (600..1600), one of 40.
    fn test_log() -> Vec<(i64, i64)> {
        let sizes: Vec<i64> = [40; 15].iter().copied().chain([1000, 40]).collect();
        log_of(&sizes)
    }

    #[test]
    fn a_batch_begun_before_the_first_step_is_reached_by_seeking_further_back() {
        // One batch of 1,000 at 600: a start at 1300 - 256 skips it, one seek to 276 reaches it.
        let log = test_log();
        let (taken, g) = consume(&log, 1300, false, 0);
        assert_eq!(taken, (1300..1640).collect::<Vec<_>>());
        assert_eq!(g.seeks(), 1);
        // A batch of 100,000 needs more steps, each four times the last.
        let log = log_of(&[10, 100_000, 5]);
        let (taken, g) = consume(&log, 90_000, false, 0);
        assert_eq!(taken, (90_000..100_015).collect::<Vec<_>>());
        assert!(g.seeks() >= 3, "{g:?}");
    }

    #[test]
    fn records_sent_again_in_one_pass_are_dropped() {
        let log = test_log();
        let (taken, mut g) = consume(&log, 1620, false, 6);
        assert_eq!(taken, (1620..1640).collect::<Vec<_>>());
        assert_eq!(g.repeats(), 6 * 40);
        // Counts are taken once each.
        assert_eq!(g.take_counts(), (0, 240));
        assert_eq!(g.take_counts(), (0, 0));
        assert_eq!(g.repeats(), 240, "the total stays");
    }

    #[test]
    fn against_kafka_nothing_is_sought_and_a_start_at_zero_is_not_watched() {
        let log = log_of(&[40, 1000, 40]);
        let (taken, g) = consume(&log, 700, true, 0);
        assert_eq!(taken, (700..1080).collect::<Vec<_>>());
        assert_eq!(g.seeks(), 0);
        let mut g = OffsetGuard::default();
        assert_eq!(g.watch("t", 0, 0, None), Offset::Offset(0));
        assert_eq!(g.verdict("t", 0, 5), Verdict::Take);
    }

    #[test]
    fn a_gap_the_log_really_has_is_crossed() {
        // Offsets 100..110 do not exist (compacted away): the guard seeks back once, reaches
        // the records before the committed offset, and takes what follows the gap.
        let mut g = OffsetGuard::default();
        assert_eq!(g.watch("t", 0, 105, None), Offset::Offset(0));
        for o in 0..100 {
            assert_eq!(g.verdict("t", 0, o), Verdict::Drop, "offset {o}");
        }
        assert_eq!(g.verdict("t", 0, 110), Verdict::Take);
        // A first record past the committed offset with nothing before it (the log starts
        // later): sought back to 0 once, then taken.
        let mut g = OffsetGuard::default();
        assert_eq!(g.watch("u", 1, 300, Some(1000)), Offset::Offset(44));
        assert_eq!(g.verdict("u", 1, 500), Verdict::SeekTo(0));
        assert_eq!(g.verdict("u", 1, 500), Verdict::Take);
        assert_eq!(g.verdict("u", 1, 499), Verdict::Drop);
        assert_eq!(g.verdict("u", 1, 501), Verdict::Take);
    }

    /// A guard that took `offsets` of partition 0 of `t`, each in turn.
    fn guard_past(offsets: std::ops::Range<i64>) -> OffsetGuard {
        let mut g = OffsetGuard::default();
        for o in offsets {
            assert_eq!(g.verdict("t", 0, o), Verdict::Take, "offset {o}");
        }
        g
    }

    #[test]
    fn a_forgotten_topic_is_read_again_from_any_offset() {
        let mut g = guard_past(0..10);
        assert_eq!(g.verdict("t", 0, 3), Verdict::Drop);
        // Another partition and another topic keep their own positions.
        assert_eq!(g.verdict("t", 1, 3), Verdict::Take);
        assert_eq!(g.verdict("v", 0, 3), Verdict::Take);
        g.forget_topic("t");
        assert_eq!(g.verdict("t", 0, 0), Verdict::Take);
        assert_eq!(g.verdict("v", 0, 2), Verdict::Drop);
    }

    #[test]
    fn after_an_automatic_offset_reset_lower_offsets_are_taken() {
        let mut g = guard_past(100..110);
        g.on_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure,
        ));
        assert_eq!(
            g.verdict("t", 0, 105),
            Verdict::Drop,
            "other errors keep positions"
        );
        g.on_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AutoOffsetReset,
        ));
        // The log was truncated: its new records start again at 0.
        assert_eq!(g.verdict("t", 0, 0), Verdict::Take);
        assert_eq!(g.verdict("t", 0, 1), Verdict::Take);
        assert_eq!(g.verdict("t", 0, 1), Verdict::Drop);
    }

    proptest! {
        /// Any log of batches, any committed offset in it, with or without repeats, against
        /// tansu's answers or Kafka's: the records taken are exactly the committed offset to
        /// the end, once each, in order.
        #[test]
        fn a_guarded_consumer_takes_exactly_the_records_from_its_committed_offset(
            sizes in proptest::collection::vec(1i64..3000, 1..12),
            at in 0.0f64..=1.0,
            kafka in any::<bool>(),
            repeats in 0usize..4,
        ) {
            let log = log_of(&sizes);
            let end: i64 = sizes.iter().sum();
            let c = ((end as f64) * at) as i64;
            let (taken, _) = consume(&log, c, kafka, repeats);
            prop_assert_eq!(taken, (c..end).collect::<Vec<_>>());
        }
    }
}
