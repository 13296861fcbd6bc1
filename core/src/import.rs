//! The importer: the home region's way in from the global bus.
//!
//! In a multi-region deployment every `iris-core` member runs one importer thread (started by
//! [`crate::service::CoreService::start`]). It reads the region's route topic
//! `iris.global.route.{region}` (`topics::route`) on the **global** brokers with its own raw
//! rdkafka `BaseConsumer` in the group `iris-import-{region}`, `assign()`ed the route partitions
//! this member owns ([`owned_partitions`]), from the group's committed offsets, with manual
//! commits. For each `Route{region, inner}` record:
//!
//! - `region` ≠ this region: counted as `misrouted`, skipped (its offset still commits);
//! - `Deliver`, `Ack`, `Relay`, `DrainRequest`, `PrekeyPut`, `PrekeyFetch`: the inner frame,
//!   encoded as a plain bus frame, is produced to the **regional** deliver topic on the
//!   partition of its key user (`partition_of(user, P)`), so the regional core handles it like
//!   a frame from a local edge (a foreign `region` in a drain request or prekey fetch makes the
//!   core answer across the global bus);
//! - `DrainChunk`, `PrekeyBundle`, `Confirmed`: produced to the regional inbox of the edge the
//!   frame names (`iris.{region}.edge.{node}`, partition 0): the answer of a home region to a
//!   roaming user logged in here, or to a v2 sender here whose recipient is homed there;
//! - `Stored`: the sender's message is stored at its recipient's home: the message's age is
//!   recorded (`iris_core_hop_seconds{hop="stored_at_home"}`), nothing is produced;
//! - undecodable records: counted, skipped.
//!
//! **Commit only what the regional broker has.** Every regional produce is ticketed
//! ([`OutFrame::ticket`]); per partition the importer keeps a queue of (offset, ticket) and
//! commits a partition's offset only up to the first record whose produce is not yet
//! acknowledged (acks=all). A produce the producer reports as refused (`acked = false`) is sent
//! again, never skipped. So a crash (kill -9) or a stopped regional broker leaves the
//! unacknowledged records uncommitted on the global bus: they are imported again at the next
//! start (at-least-once; the core stores by `(recipient, id)` and remembers acked ids, so a
//! copy is stored once).
//!
//! A visitor copy (its `origin` starts with [`crate::service::VISITOR_MARK`]) is imported like
//! any deliver but counted under its original origin and never reported back.
//! After any other `Deliver` whose `origin` is another region is acknowledged by the regional broker,
//! the importer sends `Route{origin, Stored{sender, id, home}}` on its global producer (best
//! effort: it only feeds the origin's cross-region latency metric).
//!
//! **Lost topics.** A [`TopicKeeper`] on the global brokers re-creates the route topic when the
//! broker lost it (a memory-storage global broker restarted). librdkafka (2.12) cannot follow a
//! re-created topic in place (see [`crate::service`]), so the importer does not try: once its
//! [`RecreationCursor`] reports the route topic, the importer thread stops at once, commits
//! nothing more and destroys none of its clients, and [`Importer::lost_topics`] tells the core
//! service, which exits with [`CoreError::TopicsLost`] (status 75) for its supervisor to restart
//! it. The restarted importer reads the new log from its beginning (the lost broker lost the
//! group's offsets too). Routes produced before the loss are gone with the broker.
//!
//! Counters ([`ImportStats`]) are rendered by the core's `/metrics`:
//! `iris_core_imported_total{region="<origin>"}`, `iris_core_import_lag_records`,
//! `iris_core_import_misrouted_total`, hops `imported` and `stored_at_home`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iris_bus::home::Homes;
use iris_bus::hops::HopHistogram;
use iris_bus::kafka::{
    ensure_topics_within, start_offsets, Done, KafkaConfig, KafkaProducer, OffsetGuard, OutFrame,
    ProducerRing, ReadMarks, RecreationCursor, TopicKeeper, MARKS_EVERY, NO_TICKET,
};
use iris_bus::{decode_counted, encode, to_owned, BusFrame, FrameStats, Route, Routed, Stored};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::error::CoreError;
use crate::service::{owned_partitions, topic_partitions};

/// How often the offsets that may be committed are committed (asynchronously).
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// How often the lag gauge is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Produces not yet acknowledged beyond which consumption pauses.
const MAX_PENDING: usize = 100_000;

/// How long a stopping importer waits for its produces' acknowledgements.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How long one connection attempt waits for the global brokers.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How long the importer waits between connection attempts while the global bus is down.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// How often the topic keeper checks the route topic.
const KEEPER_EVERY: Duration = Duration::from_secs(2);

/// What the importer needs.
#[derive(Debug, Clone)]
pub struct ImportConfig {
    /// Region list, this region, home table.
    pub homes: Arc<Homes>,
    /// The regional brokers (deliver topic, edge inboxes).
    pub regional: KafkaConfig,
    /// The global brokers (route topics).
    pub global: KafkaConfig,
    /// Partitions of the regional deliver topic (the key user's partition there).
    pub deliver_partitions: u32,
    /// Partitions the route topics get when this process creates them.
    pub partitions: u32,
    /// This member and how many share the region (route partitions split like the deliver
    /// topic's).
    pub member: u32,
    pub members: u32,
}

/// The importer's counters (shared with the admin endpoint).
#[derive(Debug, Default)]
pub struct ImportStats {
    /// Records imported per origin region: a deliver's `origin`, a drain request's or prekey
    /// fetch's `region`, a stored notice's `home`, the user's home for a drain chunk or prekey
    /// bundle; empty for acks, relays and prekey puts (they do not name their region).
    pub imported: Mutex<BTreeMap<String, u64>>,
    /// Route records naming another region (skipped).
    pub misrouted: AtomicU64,
    /// Records that did not decode or carried nothing importable (skipped).
    pub skipped: AtomicU64,
    /// Regional produces refused by the producer and sent again.
    pub resent: AtomicU64,
    /// `Stored` notices sent back to the origin region.
    pub stored_sent: AtomicU64,
    /// `Stored` notices received (messages of this region stored at their home).
    pub stored_seen: AtomicU64,
    /// Global high watermark minus position, summed over the owned partitions (a gauge).
    pub lag: AtomicU64,
    /// Route partitions sought back to an earlier batch at a start, because the broker
    /// answered from past the committed offset (tansu: a fetch from inside a record batch).
    pub batch_seeks: AtomicU64,
    /// Route records the broker sent again in one pass (tansu), dropped.
    pub broker_repeats: AtomicU64,
    /// Produces waiting for the regional broker's acknowledgement (a gauge).
    pub pending: AtomicU64,
    /// Decode outcomes of the route records.
    pub frames: FrameStats,
    /// Message age when imported (delivers).
    pub hop_imported: HopHistogram,
    /// Message age when its home's `Stored` notice came back (this region's messages).
    pub hop_stored_at_home: HopHistogram,
}

impl ImportStats {
    fn count_imported(&self, origin: &str) {
        let mut m = self.imported.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(origin.to_owned()).or_insert(0) += 1;
    }

    /// Imported records per origin region.
    pub fn imported(&self) -> BTreeMap<String, u64> {
        self.imported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Imported records, all origins.
    pub fn imported_total(&self) -> u64 {
        self.imported().values().sum()
    }
}

/// The running importer thread.
#[derive(Debug)]
pub struct Importer {
    stop: Arc<AtomicBool>,
    /// The route topics found re-created; set once, by the importer thread, as it stops.
    lost: Arc<std::sync::OnceLock<Vec<String>>>,
    stats: Arc<ImportStats>,
    thread: Option<JoinHandle<Result<(), CoreError>>>,
}

impl Importer {
    /// Starts the importer thread. The thread connects to the global brokers (ensures the
    /// route topics of every listed region, assigns this member's route partitions, starts both
    /// producers), retrying every [`CONNECT_RETRY`] while the global bus cannot be reached:
    /// a down global bus never keeps the region's core from starting.
    pub fn start(cfg: ImportConfig, stats: Arc<ImportStats>) -> Result<Importer, CoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let shared = Arc::clone(&stats);
        let lost = Arc::new(std::sync::OnceLock::new());
        let lost_in = Arc::clone(&lost);
        let thread = std::thread::Builder::new()
            .name("iris-core-import".to_owned())
            .spawn(move || {
                let mut logged = false;
                let mut worker = loop {
                    if flag.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    match Worker::connect(&cfg, &shared) {
                        Ok(w) => break w,
                        Err(e) => {
                            if !logged {
                                logged = true;
                                warn!(error = %e, "importer cannot reach the global bus yet, retrying");
                            } else {
                                debug!(error = %e, "importer connect failed, retrying");
                            }
                            std::thread::sleep(CONNECT_RETRY);
                        }
                    }
                };
                match worker.run(&flag) {
                    Err(CoreError::TopicsLost { topics }) => {
                        // Its librdkafka clients may hang when destroyed: leaked; the process
                        // exits next.
                        std::mem::forget(worker);
                        let _ = lost_in.set(topics);
                        Ok(())
                    }
                    r => r,
                }
            })?;
        Ok(Importer {
            stop,
            lost,
            stats,
            thread: Some(thread),
        })
    }

    /// The counters.
    /// The route topics the keeper re-created, once the importer stopped for them (the core
    /// is then to exit for a restart, [`CoreError::TopicsLost`]); `None` while it runs.
    pub fn lost_topics(&self) -> Option<Vec<String>> {
        self.lost.get().cloned()
    }

    pub fn stats(&self) -> &Arc<ImportStats> {
        &self.stats
    }

    /// Stops the thread: waits (at most 5 s) for the produces in flight, commits what they
    /// cover synchronously, flushes both producers.
    pub fn stop(mut self) -> Result<(), CoreError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| CoreError::ThreadPanicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for Importer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A regional produce waiting for its acknowledgement.
struct Pending {
    frame: OutFrame,
    /// For an imported deliver from another region: (origin, sender, id) of the `Stored`
    /// notice sent once acknowledged.
    stored: Option<(String, Vec<u8>, u64)>,
}

struct Worker {
    own: String,
    topic: String,
    deliver_topic: Arc<str>,
    cfg: ImportConfig,
    consumer: BaseConsumer,
    /// Holds the route partitions to their committed offsets at start.
    offset_guard: OffsetGuard,
    regional: Option<KafkaProducer>,
    ring: ProducerRing,
    global: Option<KafkaProducer>,
    gring: ProducerRing,
    keeper: Option<TopicKeeper>,
    recreations: Option<RecreationCursor>,
    /// What was read last from each route partition, for the keeper's check.
    read_marks: Arc<ReadMarks>,
    stats: Arc<ImportStats>,
    /// Per route partition: (offset, ticket) of the records not committed yet, in offset order
    /// (ticket [`NO_TICKET`]: nothing to wait for).
    queues: HashMap<i32, VecDeque<(i64, u64)>>,
    pending: HashMap<u64, Pending>,
    next_ticket: u64,
    done: Vec<Done>,
    /// Next offset to consume per route partition (for the lag).
    positions: HashMap<i32, i64>,
    /// High watermarks of the owned partitions, asked for off the import loop.
    lag_watch: LagWatcher,
    inboxes: HashMap<u32, Arc<str>>,
    routes: HashMap<String, Arc<str>>,
    /// Last offset committed per partition.
    committed: HashMap<i32, i64>,
    logged_consume_error: bool,
}

impl Worker {
    /// Ensures the route topics on the global brokers, assigns this member's route partitions
    /// and starts both producers and the route topic's keeper.
    fn connect(cfg: &ImportConfig, stats: &Arc<ImportStats>) -> Result<Worker, CoreError> {
        let own = cfg.homes.own().to_owned();
        let parts = cfg.partitions.max(1) as i32;
        let topics: Vec<(String, i32)> = cfg
            .homes
            .regions()
            .iter()
            .map(|r| (iris_bus::topics::route(r), parts))
            .collect();
        ensure_topics_within(&cfg.global, &topics, CONNECT_WAIT)?;
        let topic = iris_bus::topics::route(&own);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.global.brokers)
            .set("client.id", format!("iris-import-{own}-{}", cfg.member))
            .set("group.id", format!("iris-import-{own}"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "fetch.wait.max.ms",
                cfg.global.fetch_wait_max_ms.to_string(),
            )
            .set("socket.nagle.disable", "true")
            .set("log_level", "3")
            .create()?;
        let route_parts = topic_partitions(&consumer, &topic)?;
        let assigned = owned_partitions(route_parts, cfg.member, cfg.members);
        let mut tpl = TopicPartitionList::with_capacity(assigned.len());
        let owned: Vec<(String, i32)> = assigned.iter().map(|&p| (topic.clone(), p)).collect();
        let starts = start_offsets(&consumer, &owned, CONNECT_WAIT);
        for (&p, start) in assigned.iter().zip(starts.offsets) {
            tpl.add_partition_offset(&topic, p, start)?;
        }
        let offset_guard = starts.guard;
        consumer.assign(&tpl)?;
        let (regional, mut rings) = KafkaProducer::start(&cfg.regional, 1)?;
        let ring = rings.pop().ok_or(CoreError::ThreadPanicked)?;
        let (global, mut grings) = KafkaProducer::start(&cfg.global, 1)?;
        let gring = grings.pop().ok_or(CoreError::ThreadPanicked)?;
        // What was read last from each route partition: the keeper checks that the logs are
        // still those (another region's core may have re-created the topic first).
        let read_marks = ReadMarks::new(&topic);
        let keeper = match TopicKeeper::start_watching(
            &cfg.global,
            vec![(topic.clone(), parts)],
            KEEPER_EVERY,
            Some((Arc::clone(&read_marks), MARKS_EVERY)),
        ) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "route topic keeper not started, a lost route topic is not re-created");
                None
            }
        };
        let recreations = keeper
            .as_ref()
            .map(|k| RecreationCursor::new(k.recreations(), &[&topic]));
        info!(
            region = %own,
            topic = %topic,
            partitions = route_parts,
            assigned = ?assigned,
            "importer assigned its route partitions"
        );
        let lag_watch = LagWatcher::start(&cfg.global, &topic, &assigned)?;
        Ok(Worker {
            lag_watch,
            deliver_topic: Arc::from(iris_bus::topics::deliver(&own)),
            own,
            topic,
            cfg: cfg.clone(),
            consumer,
            regional: Some(regional),
            ring,
            global: Some(global),
            gring,
            keeper,
            recreations,
            read_marks,
            stats: Arc::clone(stats),
            queues: HashMap::new(),
            pending: HashMap::new(),
            next_ticket: 1,
            done: Vec::new(),
            positions: HashMap::new(),
            inboxes: HashMap::new(),
            routes: HashMap::new(),
            committed: HashMap::new(),
            logged_consume_error: false,
            offset_guard,
        })
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), CoreError> {
        let mut committed_at = Instant::now();
        let mut lag_at = Instant::now();
        while !stop.load(Ordering::Acquire) {
            self.check_recreated()?;
            if self.pending.len() >= MAX_PENDING {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                let timeout = if self.pending.is_empty() {
                    Duration::from_millis(50)
                } else {
                    Duration::from_millis(1)
                };
                self.poll_one(timeout);
            }
            self.take_done();
            if committed_at.elapsed() >= COMMIT_EVERY {
                committed_at = Instant::now();
                self.commit(CommitMode::Async);
            }
            if lag_at.elapsed() >= LAG_EVERY {
                lag_at = Instant::now();
                self.refresh_lag();
            }
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.take_done();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.commit(CommitMode::Sync);
        if !self.pending.is_empty() {
            warn!(
                pending = self.pending.len(),
                "imports not acknowledged at shutdown; they are imported again at the next start"
            );
        }
        for p in [self.regional.take(), self.global.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = p.flush_and_stop(Duration::from_secs(2)) {
                debug!(error = %e, "importer producer not flushed at shutdown");
            }
        }
        if let Some(k) = self.keeper.take() {
            k.stop();
        }
        Ok(())
    }

    /// Fails with [`CoreError::TopicsLost`] once the keeper re-created the route topic: the
    /// consumer cannot follow the new log in place (module doc, "Lost topics"). Nothing is
    /// committed or flushed on that way out.
    fn check_recreated(&mut self) -> Result<(), CoreError> {
        let Some(c) = &mut self.recreations else {
            return Ok(());
        };
        let topics = c.take();
        if topics.is_empty() {
            return Ok(());
        }
        warn!(topics = ?topics, "the global broker lost the route topic: the importer stops for a restart");
        Err(CoreError::TopicsLost { topics })
    }

    fn poll_one(&mut self, timeout: Duration) {
        match self.consumer.poll(timeout) {
            None => {}
            Some(Err(e)) => {
                self.offset_guard.on_error(&e);
                if !self.logged_consume_error {
                    self.logged_consume_error = true;
                    warn!(error = %e, "global bus consume error (logged once)");
                } else {
                    debug!(error = %e, "global bus consume error");
                }
                if let Some(k) = &self.keeper {
                    k.poke();
                }
            }
            Some(Ok(msg))
                if !self.offset_guard.admit_counted(
                    &self.consumer,
                    &msg,
                    &self.stats.batch_seeks,
                    &self.stats.broker_repeats,
                ) =>
            {
                // Imported before this start (or sought back to an earlier batch).
            }
            Some(Ok(msg)) => {
                let (partition, offset) = (msg.partition(), msg.offset());
                let payload = msg.payload().unwrap_or_default().to_vec();
                let timestamp = msg.timestamp().to_millis().unwrap_or(-1);
                drop(msg);
                self.read_marks.note(partition, offset, timestamp, &payload);
                self.positions.insert(partition, offset + 1);
                let ticket = self.import(&payload);
                self.queues
                    .entry(partition)
                    .or_default()
                    .push_back((offset, ticket));
            }
        }
    }

    /// Imports one route record; returns the ticket of its regional produce ([`NO_TICKET`]
    /// when nothing was produced).
    fn import(&mut self, record: &[u8]) -> u64 {
        let Ok(archived) = decode_counted(&self.stats.frames, record) else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return NO_TICKET;
        };
        let Ok(BusFrame::Route(Route { region, inner })) = to_owned(archived) else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            debug!("record on a route topic is not a route, skipped");
            return NO_TICKET;
        };
        if region != self.own {
            self.stats.misrouted.fetch_add(1, Ordering::Relaxed);
            debug!(region = %region, "route for another region, skipped");
            return NO_TICKET;
        }
        let origin = match &inner {
            // A visitor copy (a home's live copy for a user roaming here) carries the mark.
            Routed::Deliver(d) => d
                .origin
                .strip_prefix(crate::service::VISITOR_MARK)
                .unwrap_or(&d.origin)
                .to_owned(),
            Routed::DrainRequest(r) => r.region.clone(),
            Routed::PrekeyFetch(f) => f.region.clone(),
            Routed::Stored(s) => s.home.clone(),
            // Answers of the user's home.
            Routed::DrainChunk(c) => self.cfg.homes.home_of(&c.user).to_owned(),
            Routed::PrekeyBundle(b) => self.cfg.homes.home_of(&b.user).to_owned(),
            // Acks, relays, prekey puts and confirms do not name the region that sent them.
            Routed::Ack(_) | Routed::Relay(_) | Routed::PrekeyPut(_) | Routed::Confirmed(_) => {
                String::new()
            }
        };
        self.stats.count_imported(&origin);
        let (topic, partition, stored) = match &inner {
            Routed::Stored(s) => {
                self.stats.stored_seen.fetch_add(1, Ordering::Relaxed);
                self.stats.hop_stored_at_home.record_id(s.id);
                return NO_TICKET;
            }
            Routed::DrainChunk(c) => (self.inbox(c.node), 0, None),
            Routed::PrekeyBundle(b) => (self.inbox(b.node), 0, None),
            Routed::Confirmed(c) => (self.inbox(c.to.node), 0, None),
            Routed::Deliver(d) => {
                self.stats.hop_imported.record_id(d.id);
                // Only a message stored at home here is reported back; a visitor copy is not.
                let stored = (!d.origin.is_empty()
                    && d.origin != self.own
                    && !d.origin.starts_with(crate::service::VISITOR_MARK))
                .then(|| (d.origin.clone(), d.sender.clone(), d.id));
                (
                    Arc::clone(&self.deliver_topic),
                    self.deliver_partition(&inner),
                    stored,
                )
            }
            _ => (
                Arc::clone(&self.deliver_topic),
                self.deliver_partition(&inner),
                None,
            ),
        };
        let key = routed_key(&inner).to_vec();
        let payload = match encode(&BusFrame::from(inner)) {
            Ok(p) => p,
            Err(e) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "imported frame not encoded, skipped");
                return NO_TICKET;
            }
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let frame = OutFrame {
            topic,
            partition,
            key: Some(key),
            payload,
            ticket,
        };
        self.pending.insert(
            ticket,
            Pending {
                frame: frame.clone(),
                stored,
            },
        );
        send(&self.ring, frame);
        self.stats
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        ticket
    }

    fn deliver_partition(&self, inner: &Routed) -> i32 {
        iris_bus::topics::partition_of(routed_key(inner), self.cfg.deliver_partitions) as i32
    }

    fn inbox(&mut self, node: u32) -> Arc<str> {
        let own = &self.own;
        Arc::clone(
            self.inboxes
                .entry(node)
                .or_insert_with(|| Arc::from(iris_bus::topics::edge_inbox(own, node))),
        )
    }

    /// Takes the producers' reports: an acknowledged produce leaves `pending` (and sends its
    /// `Stored` notice); a refused one is sent again.
    fn take_done(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.ring.take_done(&mut done);
        for d in done.drain(..) {
            if d.acked {
                if let Some(p) = self.pending.remove(&d.ticket) {
                    if let Some((origin, sender, id)) = p.stored {
                        self.send_stored(origin, sender, id);
                    }
                }
            } else if let Some(p) = self.pending.get(&d.ticket) {
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
                debug!(ticket = d.ticket, "regional produce refused, sent again");
                send(&self.ring, p.frame.clone());
            }
        }
        self.done = done;
        // The global producer's reports (stored notices are not ticketed): nothing to take,
        // but keep its done list from growing.
        self.gring.take_done(&mut self.done);
        self.done.clear();
        self.stats
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    fn send_stored(&mut self, origin: String, sender: Vec<u8>, id: u64) {
        let topic = Arc::clone(
            self.routes
                .entry(origin.clone())
                .or_insert_with(|| Arc::from(iris_bus::topics::route(&origin))),
        );
        let partition = iris_bus::topics::partition_of(&sender, self.cfg.partitions) as i32;
        let frame = BusFrame::Route(Route {
            region: origin,
            inner: Routed::Stored(Stored {
                sender: sender.clone(),
                id,
                home: self.own.clone(),
            }),
        });
        let Ok(payload) = encode(&frame) else {
            return;
        };
        let out = OutFrame {
            topic,
            partition,
            key: Some(sender),
            payload,
            ticket: NO_TICKET,
        };
        if self.gring.try_send(out).is_ok() {
            self.stats.stored_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Commits, per partition, up to the first record whose produce is not acknowledged.
    fn commit(&mut self, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        for (&p, q) in &mut self.queues {
            let mut next = None;
            while let Some(&(offset, ticket)) = q.front() {
                if ticket != NO_TICKET && self.pending.contains_key(&ticket) {
                    break;
                }
                next = Some(offset + 1);
                q.pop_front();
            }
            if let Some(n) = next {
                if self.committed.get(&p) != Some(&n) {
                    self.committed.insert(p, n);
                    let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(n));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            debug!(error = %e, "route offset commit refused, records may be imported again");
            if matches!(mode, CommitMode::Sync) {
                warn!(error = %e, "final route offset commit refused, records will be imported again");
            }
        }
    }

    /// Sums (high watermark − next offset) over the owned partitions, every [`LAG_EVERY`], from
    /// the high watermarks the [`LagWatcher`] thread asked for: the import loop never waits for
    /// the broker here (a watermark request is answered only at the broker's fetch wait; asked
    /// from this loop, one per partition stalled imports for seconds).
    fn refresh_lag(&mut self) {
        let highs = self.lag_watch.highs();
        let mut lag = 0u64;
        for (p, high) in highs {
            if let Some(&pos) = self.positions.get(&p) {
                lag += high.saturating_sub(pos).max(0) as u64;
            }
        }
        self.stats.lag.store(lag, Ordering::Relaxed);
    }
}

/// A thread asking the global brokers for the high watermarks of the importer's partitions every
/// [`LAG_EVERY`] (for `iris_core_import_lag_records`), so that the import loop never waits for
/// those answers. Stopped on drop.
struct LagWatcher {
    stop: Arc<AtomicBool>,
    highs: Arc<Mutex<HashMap<i32, i64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LagWatcher {
    fn start(cfg: &KafkaConfig, topic: &str, assigned: &[i32]) -> Result<LagWatcher, CoreError> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("client.id", "iris-import-lag")
            .set("log_level", "3")
            .create()?;
        let stop = Arc::new(AtomicBool::new(false));
        let highs = Arc::new(Mutex::new(HashMap::new()));
        let (s, h, topic, assigned) = (
            Arc::clone(&stop),
            Arc::clone(&highs),
            topic.to_owned(),
            assigned.to_vec(),
        );
        let thread = std::thread::Builder::new()
            .name("iris-import-lag".to_owned())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    for &p in &assigned {
                        if s.load(Ordering::Acquire) {
                            return;
                        }
                        if let Ok((_, high)) =
                            client.fetch_watermarks(&topic, p, Duration::from_millis(500))
                        {
                            h.lock().unwrap_or_else(|e| e.into_inner()).insert(p, high);
                        }
                    }
                    let until = Instant::now() + LAG_EVERY;
                    while Instant::now() < until && !s.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
            .map_err(|_| CoreError::ThreadPanicked)?;
        Ok(LagWatcher {
            stop,
            highs,
            thread: Some(thread),
        })
    }

    /// The latest high watermark of each partition answered so far.
    fn highs(&self) -> Vec<(i32, i64)> {
        let m = self.highs.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(&p, &h)| (p, h)).collect()
    }
}

impl Drop for LagWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The key user of a routed frame.
fn routed_key(inner: &Routed) -> &[u8] {
    inner.key_user()
}

/// Hands `frame` to a producer ring, waiting while it is full (the importer's backpressure).
fn send(ring: &ProducerRing, mut frame: OutFrame) {
    loop {
        match ring.try_send(frame) {
            Ok(()) => return,
            Err(f) => {
                frame = f;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}
