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
//! [`KafkaConsumer::watch_recreations`]: super::KafkaConsumer::watch_recreations

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;

use super::{ensure_topics_within, KafkaConfig, TransportError};

/// How long one metadata request or one re-creation may take.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Set by [`TopicKeeper::poke`]; the condvar wakes the thread.
    poked: Mutex<bool>,
    wake: Condvar,
    checks: AtomicU64,
    recreated: AtomicU64,
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
        let admin: AdminClient<DefaultClientContext> = cfg
            .base_client_config()
            .create()
            .map_err(TransportError::Config)?;
        let shared = Arc::new(Shared::default());
        let cfg = cfg.clone();
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("iris-topic-keeper".to_owned())
            .spawn(move || keep(&cfg, &admin, &topics, every, &s))
            .map_err(TransportError::Thread)?;
        Ok(TopicKeeper {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for a check now (e.g. after an "unknown topic" error).
    pub fn poke(&self) {
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
    every: Duration,
    s: &Shared,
) {
    while !s.stop.load(Ordering::Acquire) {
        check(cfg, admin, topics, s);
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
fn check(
    cfg: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[(String, i32)],
    s: &Shared,
) {
    let md = match admin.inner().fetch_metadata(None, REQUEST_WAIT) {
        Ok(md) => md,
        Err(e) => {
            s.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "topic keeper: metadata not answered");
            return;
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
        return;
    }
    match ensure_topics_within(cfg, &missing, REQUEST_WAIT) {
        Ok(()) => {
            {
                let mut m = s.per_topic.lock().unwrap_or_else(|e| e.into_inner());
                for (name, _) in &missing {
                    *m.entry(name.clone()).or_default() += 1;
                }
            }
            // After the per-topic counts: a reader that sees the new total finds them.
            s.recreated
                .fetch_add(missing.len() as u64, Ordering::Release);
            let names: Vec<&str> = missing.iter().map(|(n, _)| n.as_str()).collect();
            tracing::warn!(topics = ?names, "kafka topics were missing, re-created");
        }
        Err(e) => {
            s.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "topic keeper: re-creation failed, retried at the next check");
        }
    }
}
