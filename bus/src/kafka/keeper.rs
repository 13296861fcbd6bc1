//! The topic keeper: a thread that keeps a list of topics in existence.
//!
//! Topics are created at process start ([`super::ensure_topics`]); a broker that loses them
//! later (tansu with memory storage restarted, an operator's mistake) would leave the region
//! stuck: producers retry forever against a topic that is gone, consumers of fixed partitions
//! wait for it. A [`TopicKeeper`] checks the broker's metadata for its `(topic, partitions)`
//! list every [`TopicKeeper::start`] `every` (2 s in the services), and at once when
//! [`TopicKeeper::poke`]d, and re-creates the missing ones with [`super::ensure_topics_within`].
//!
//! A consumer of a re-created topic must start again at the new log's beginning. Its position
//! (or committed offset) belongs to the lost log: while the new log is shorter the broker answers
//! `OFFSET_OUT_OF_RANGE` and `auto.offset.reset=earliest` fixes it, but once as many records were
//! written again the old position looks valid and the records before it would be skipped.
//! So consumers watch the keeper's [`Recreations`]. librdkafka 2.12 cannot be moved onto the new
//! log in place (its consumer crashes, fetches nothing after a seek, or hangs when destroyed), so
//! the services (`iris-core`, its importer, `iris-edge` in cluster mode) exit for a restart when
//! a topic they read is re-created; [`KafkaConsumer::watch_recreations`] still offers the seek to
//! the beginning for a consumer that can afford it (records read twice are duplicates).
//!
//! A topic re-created by another process (an edge restarting before this keeper looked) is
//! found present, yet its log is new just the same. So a consumer may also hand the keeper its
//! [`ReadMarks`] (what it last read from each partition of a topic: offset, timestamp and a hash
//! of the payload); each check then reads the last record batch of every partition whose mark
//! lies in it, and a partition whose log is empty, ends before the mark, or holds another record
//! at the mark's offset counts as a re-creation of its topic ([`KeeperStats::replaced`]). That
//! reading costs the broker and this process a few fetches, so it runs after a sign that the
//! broker may have been restarted (a poke, which consumers give at a consume error, or a check
//! the broker did not answer; at most once per `every`) and otherwise every `marks_every` (30 s
//! in the services).
//!
//! [`KafkaConsumer::watch_recreations`]: super::KafkaConsumer::watch_recreations

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;

use super::consumer::read_last_batches;
use super::{ensure_topics_within, KafkaConfig, TransportError};

/// How long one metadata request or one re-creation may take.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// How often the services' keepers read their consumers' [`ReadMarks`] with no sign of a broker
/// restart (see the module doc).
pub const MARKS_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Set by [`TopicKeeper::poke`]; the condvar wakes the thread.
    poked: Mutex<bool>,
    /// Set by a poke or a check the broker did not answer: the marks are read at the next
    /// answered check.
    suspect: AtomicBool,
    wake: Condvar,
    checks: AtomicU64,
    recreated: AtomicU64,
    /// Logs found replaced under a topic that exists ([`ReadMarks`]).
    replaced: AtomicU64,
    errors: AtomicU64,
    /// Re-creations per topic name.
    per_topic: Mutex<HashMap<String, u64>>,
}

/// What a consumer watches to learn that topics it reads were re-created (their logs are new:
/// positions in them must start again at the beginning). Cheap to clone and to poll.
#[derive(Debug, Clone)]
pub struct Recreations {
    shared: Arc<Shared>,
}

impl Recreations {
    /// Re-creations of every topic so far; changes whenever any topic is re-created.
    pub fn total(&self) -> u64 {
        self.shared.recreated.load(Ordering::Acquire)
    }

    /// Re-creations of `topic` so far.
    pub fn of(&self, topic: &str) -> u64 {
        let m = self
            .shared
            .per_topic
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        m.get(topic).copied().unwrap_or(0)
    }
}

/// A consumer's view of [`Recreations`]: which of its topics were re-created since it last
/// looked.
#[derive(Debug)]
pub struct RecreationCursor {
    watch: Recreations,
    total: u64,
    seen: HashMap<String, u64>,
}

impl RecreationCursor {
    /// Starts at the current counts: only later re-creations are reported.
    pub fn new(watch: Recreations, topics: &[&str]) -> RecreationCursor {
        let seen = topics
            .iter()
            .map(|t| ((*t).to_owned(), watch.of(t)))
            .collect();
        RecreationCursor {
            total: watch.total(),
            watch,
            seen,
        }
    }

    /// The watched topics re-created since the last call (one atomic load when none was).
    pub fn take(&mut self) -> Vec<String> {
        let total = self.watch.total();
        if total == self.total {
            return Vec::new();
        }
        self.total = total;
        let mut out = Vec::new();
        for (topic, seen) in &mut self.seen {
            let now = self.watch.of(topic);
            if now != *seen {
                *seen = now;
                out.push(topic.clone());
            }
        }
        out
    }
}

/// A snapshot of the keeper's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeeperStats {
    /// Metadata checks answered by the broker.
    pub checks: u64,
    /// Topics found missing and re-created.
    pub recreated: u64,
    /// Topics whose log was found replaced (re-created by another process) under a
    /// [`ReadMarks`] mark; counted in `recreated` too.
    pub replaced: u64,
    /// Checks or re-creations that failed (broker unreachable; retried at the next check).
    pub errors: u64,
}

/// The handle of a keeper thread; dropping it stops the thread.
#[derive(Debug)]
pub struct TopicKeeper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TopicKeeper {
    /// Starts a thread that checks `topics` (name, partitions when created) every `every` and
    /// re-creates the missing ones.
    pub fn start(
        cfg: &KafkaConfig,
        topics: Vec<(String, i32)>,
        every: Duration,
    ) -> Result<TopicKeeper, TransportError> {
        Self::start_watching(cfg, topics, every, None)
    }

    /// [`Self::start`], also checking that the logs under `marks` are the ones its consumer
    /// read (see the module doc): at the first answered check after a poke or an unanswered
    /// check (at most once per `every`), and at least every `marks_every`.
    pub fn start_watching(
        cfg: &KafkaConfig,
        topics: Vec<(String, i32)>,
        every: Duration,
        marks: Option<(Arc<ReadMarks>, Duration)>,
    ) -> Result<TopicKeeper, TransportError> {
        let admin: AdminClient<DefaultClientContext> = cfg
            .base_client_config()
            .create()
            .map_err(TransportError::Config)?;
        let shared = Arc::new(Shared::default());
        let cfg = cfg.clone();
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("iris-topic-keeper".to_owned())
            .spawn(move || {
                let marks = marks.as_ref().map(|(m, e)| (m.as_ref(), *e));
                keep(&cfg, &admin, &topics, marks, every, &s)
            })
            .map_err(TransportError::Thread)?;
        Ok(TopicKeeper {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for a check now (e.g. after an "unknown topic" error).
    pub fn poke(&self) {
        self.shared.suspect.store(true, Ordering::Release);
        let mut p = self.shared.poked.lock().unwrap_or_else(|e| e.into_inner());
        *p = true;
        self.shared.wake.notify_one();
    }

    /// The handle consumers watch to learn of re-created topics.
    pub fn recreations(&self) -> Recreations {
        Recreations {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> KeeperStats {
        let s = &self.shared;
        KeeperStats {
            checks: s.checks.load(Ordering::Relaxed),
            recreated: s.recreated.load(Ordering::Relaxed),
            replaced: s.replaced.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread and waits for it (at most one request's time).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TopicKeeper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The keeper thread: check, re-create, wait for `every` or a poke.
fn keep(
    cfg: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[(String, i32)],
    marks: Option<(&ReadMarks, Duration)>,
    every: Duration,
    s: &Shared,
) {
    // Created at the first check that needs it.
    let mut probe: Option<BaseConsumer> = None;
    // When the marks were last read in full (`None`: not yet).
    let mut marks_read: Option<std::time::Instant> = None;
    while !s.stop.load(Ordering::Acquire) {
        if !check(cfg, admin, topics, s) {
            s.suspect.store(true, Ordering::Release);
        } else if let Some((m, marks_every)) = marks {
            // A suspicion is acted on at most once per `every`: a consumer that keeps failing
            // pokes at every error.
            let since = marks_read.map(|t| t.elapsed());
            let due = since.is_none_or(|e| e >= marks_every);
            let may = since.is_none_or(|e| e >= every);
            if due || (may && s.suspect.swap(false, Ordering::AcqRel)) {
                if check_marks(cfg, admin, m, &mut probe, s) {
                    marks_read = Some(std::time::Instant::now());
                } else {
                    s.suspect.store(true, Ordering::Release);
                }
            }
        }
        let mut poked = s.poked.lock().unwrap_or_else(|e| e.into_inner());
        if !*poked && !s.stop.load(Ordering::Acquire) {
            poked = s
                .wake
                .wait_timeout(poked, every)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *poked = false;
    }
}

/// One check: the topics of `topics` missing from the broker's metadata are re-created.
/// True when the broker answered and none was missing.
fn check(
    cfg: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[(String, i32)],
    s: &Shared,
) -> bool {
    let md = match admin.inner().fetch_metadata(None, REQUEST_WAIT) {
        Ok(md) => md,
        Err(e) => {
            s.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "topic keeper: metadata not answered");
            return false;
        }
    };
    s.checks.fetch_add(1, Ordering::Relaxed);
    let missing: Vec<(String, i32)> = topics
        .iter()
        .filter(|(name, _)| {
            !md.topics()
                .iter()
                .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        })
        .cloned()
        .collect();
    if missing.is_empty() {
        return true;
    }
    match ensure_topics_within(cfg, &missing, REQUEST_WAIT) {
        Ok(()) => {
            let names: Vec<&str> = missing.iter().map(|(n, _)| n.as_str()).collect();
            count_recreated(s, &names);
            tracing::warn!(topics = ?names, "kafka topics were missing, re-created");
        }
        Err(e) => {
            s.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "topic keeper: re-creation failed, retried at the next check");
        }
    }
    false
}

/// Counts a re-creation of each of `names` for the [`Recreations`] watchers.
fn count_recreated(s: &Shared, names: &[&str]) {
    {
        let mut m = s.per_topic.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            *m.entry((*name).to_owned()).or_default() += 1;
        }
    }
    // After the per-topic counts: a reader that sees the new total finds them.
    s.recreated.fetch_add(names.len() as u64, Ordering::Release);
}

/// What a consumer last read from one partition: enough to tell that record from another one
/// written at the same offset of a new log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub offset: i64,
    /// The record's timestamp (create time, set by its producer; -1 when it has none).
    pub timestamp: i64,
    /// A hash of its payload ([`payload_hash`]).
    pub hash: u64,
}

/// The hash [`Mark::hash`] holds: foldhash with a fixed seed, the same in every process.
pub fn payload_hash(payload: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x1e15).hash_one(payload)
}

/// What a consumer last read from each partition of one topic, shared with its
/// [`TopicKeeper`] ([`TopicKeeper::start_watching`]). The consumer notes every record it
/// handles ([`Self::note`]: a lock, never contended but at the keeper's check).
#[derive(Debug)]
pub struct ReadMarks {
    topic: String,
    marks: Mutex<HashMap<i32, Mark>>,
}

impl ReadMarks {
    pub fn new(topic: &str) -> Arc<ReadMarks> {
        Arc::new(ReadMarks {
            topic: topic.to_owned(),
            marks: Mutex::new(HashMap::new()),
        })
    }

    /// The topic the marks are for.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Notes the record just handled from `partition`.
    pub fn note(&self, partition: i32, offset: i64, timestamp: i64, payload: &[u8]) {
        let mark = Mark {
            offset,
            timestamp,
            hash: payload_hash(payload),
        };
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition, mark);
    }

    /// Drops `partition`'s mark if it is still `mark` (its log was found replaced: reported
    /// once).
    fn forget(&self, partition: i32, mark: Mark) {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&partition) == Some(&mark) {
            m.remove(&partition);
        }
    }

    fn snapshot(&self) -> Vec<(i32, Mark)> {
        let m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(i32, Mark)> = m.iter().map(|(&p, &k)| (p, k)).collect();
        v.sort_unstable_by_key(|&(p, _)| p);
        v
    }
}

/// Whether a partition's log still holds the record `mark` names, from the log's high
/// watermark and the records of its last batch (`None`: that batch was not read).
///
/// tansu 0.6 reports as high watermark one past the first offset of the last batch, so the
/// records from `high - 1` to the log's end are that batch's; Kafka reports the log's end.
fn mark_holds(mark: Mark, high: i64, last_batch: Option<&[Mark]>) -> Option<bool> {
    if high <= 0 {
        return Some(false); // an empty log: a new one
    }
    if mark.offset < high - 1 {
        return Some(true); // before the last batch: not checked (see the module doc)
    }
    let batch = last_batch?;
    Some(batch.contains(&mark))
}

/// Reads the marks' partitions' last batches and counts a re-creation of the marks' topic
/// when one of them no longer holds its mark. True when every mark got a verdict.
fn check_marks(
    cfg: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    marks: &ReadMarks,
    probe: &mut Option<BaseConsumer>,
    s: &Shared,
) -> bool {
    let topic = marks.topic();
    let mut to_read: Vec<(i32, Mark, i64)> = Vec::new();
    for (partition, mark) in marks.snapshot() {
        let high = match admin
            .inner()
            .fetch_watermarks(topic, partition, REQUEST_WAIT)
        {
            Ok((_, high)) => high,
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "topic keeper: watermarks not answered");
                return false;
            }
        };
        match mark_holds(mark, high, None) {
            Some(true) => {}
            Some(false) => {
                replaced(s, marks, partition, mark, high);
                return true;
            }
            None => to_read.push((partition, mark, high)),
        }
    }
    if to_read.is_empty() {
        return true;
    }
    if probe.is_none() {
        match cfg
            .base_client_config()
            .set("group.id", format!("{}-keeper-probe", cfg.client_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
            .create()
        {
            Ok(c) => *probe = Some(c),
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "topic keeper: probe consumer not created");
                return false;
            }
        }
    }
    let Some(c) = probe.as_ref() else {
        return false;
    };
    let parts: Vec<(&str, i32, i64)> = to_read
        .iter()
        .map(|&(p, _, high)| (topic, p, high))
        .collect();
    let batches =
        read_last_batches(c, &parts, REQUEST_WAIT).unwrap_or_else(|| vec![None; to_read.len()]);
    let mut complete = true;
    for ((partition, mark, high), batch) in to_read.iter().zip(&batches) {
        match mark_holds(*mark, *high, batch.as_deref()) {
            Some(true) => {}
            Some(false) => {
                replaced(s, marks, *partition, *mark, *high);
                return true;
            }
            None => complete = false,
        }
    }
    complete
}

/// Counts the replaced log of the marks' topic as a re-creation (its consumers start again).
fn replaced(s: &Shared, marks: &ReadMarks, partition: i32, mark: Mark, high: i64) {
    let topic = marks.topic();
    marks.forget(partition, mark);
    s.replaced.fetch_add(1, Ordering::Relaxed);
    count_recreated(s, &[topic]);
    tracing::warn!(
        topic,
        partition,
        read_offset = mark.offset,
        high_watermark = high,
        "kafka topic's log replaced (re-created by another process): the record read last is gone"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(offset: i64, payload: &[u8]) -> Mark {
        Mark {
            offset,
            timestamp: 1_000 + offset,
            hash: payload_hash(payload),
        }
    }

    #[test]
    fn an_empty_log_never_holds_a_mark() {
        assert_eq!(mark_holds(mark(0, b"a"), 0, None), Some(false));
        assert_eq!(mark_holds(mark(7, b"a"), 0, Some(&[])), Some(false));
    }

    #[test]
    fn a_mark_before_the_last_batch_is_not_checked() {
        // tansu: the last batch starts at high - 1 = 9; offset 8 lies in an earlier one.
        assert_eq!(mark_holds(mark(8, b"a"), 10, None), Some(true));
    }

    #[test]
    fn a_mark_in_the_last_batch_is_looked_up_in_it() {
        let batch = [mark(9, b"x"), mark(10, b"a"), mark(11, b"y")];
        // Not read: no verdict.
        assert_eq!(mark_holds(mark(10, b"a"), 10, None), None);
        // The same record (offset, timestamp, payload): held.
        assert_eq!(mark_holds(mark(10, b"a"), 10, Some(&batch)), Some(true));
        // Another payload at that offset, or another timestamp: a new log.
        assert_eq!(mark_holds(mark(10, b"b"), 10, Some(&batch)), Some(false));
        let mut other_time = mark(10, b"a");
        other_time.timestamp += 1;
        assert_eq!(mark_holds(other_time, 10, Some(&batch)), Some(false));
        // The log ends before the mark (tansu's watermark is inside the last batch).
        assert_eq!(mark_holds(mark(12, b"z"), 10, Some(&batch)), Some(false));
    }

    #[test]
    fn marks_keep_the_last_record_per_partition_and_forget_only_the_one_reported() {
        let marks = ReadMarks::new("t");
        marks.note(1, 4, 10, b"a");
        marks.note(0, 2, 10, b"b");
        marks.note(1, 5, 11, b"c");
        let snap = marks.snapshot();
        assert_eq!(
            snap,
            vec![
                (
                    0,
                    Mark {
                        offset: 2,
                        timestamp: 10,
                        hash: payload_hash(b"b")
                    }
                ),
                (
                    1,
                    Mark {
                        offset: 5,
                        timestamp: 11,
                        hash: payload_hash(b"c")
                    }
                ),
            ]
        );
        // A mark moved on since the check: kept.
        marks.forget(1, snap[0].1);
        marks.forget(
            1,
            Mark {
                offset: 4,
                timestamp: 10,
                hash: payload_hash(b"a"),
            },
        );
        assert_eq!(marks.snapshot().len(), 2);
        marks.forget(0, snap[0].1);
        assert_eq!(marks.snapshot(), vec![snap[1]]);
    }
}
