//! The edge's link to a regional cluster: the same [`ShardLink`] seam as [`crate::embedded`],
//! with Kafka and Redis behind it instead of an in-process store.
//!
//! An edge in cluster mode (`iris-edge --bus kafka`) starts a [`RemoteCore`] where the one-box
//! edge starts an [`crate::embedded::EmbeddedCore`]. Its shards do not know the difference: they
//! push [`CoreRequest`]s and take [`CoreReply`]s exactly as before. Behind the links:
//!
//! - the **bridge thread** (`iris-bus-bridge`) turns each request into a bus frame
//!   ([`iris_bus::BusFrame`]) on the producer ring, keyed and partitioned by user
//!   ([`topics::partition_of`] over the deliver topic's real partition count): `Store` →
//!   `Deliver`, `Ack` → `Ack`, `Drain` → `DrainRequest`, prekeys → `PrekeyPut`/`PrekeyFetch`,
//!   `Relay` → `Relay`, all on `iris.{region}.deliver`; `Online`/`Offline` → a session write
//!   (Redis, [`SessionWriter`], batched and pipelined on its own thread) and a `Presence` frame
//!   on `iris.{region}.presence`. Before a `DrainRequest` the bridge takes in every request
//!   already queued by any shard, so a message accepted before the login's drain is produced
//!   before it (the same rule as the embedded core).
//! - **cross-region** (more than one region configured): a request about a user homed in
//!   another region ([`Homes::home_of`]; the recipient of a message or relay, the user of an
//!   ack, drain or prekey request) becomes `Route{home, inner}` on `iris.global.route.{home}`
//!   through a second producer ring on the global brokers (drain requests and prekey fetches
//!   name this region so the answers come back here). Both rings report to the same outbox
//!   (tickets are its sequence numbers); each keeps its own held queue, in order.
//! - the **outbox** ([`crate::outbox`], `{data_dir}/outbox`): every `Deliver` and `PrekeyPut`
//!   is appended to the edge's write-ahead log as the bridge produces it, with its sequence
//!   number as the producer ticket; the log is written each bridge pass and fsynced by its own
//!   thread at most every `outbox_commit_ms`, and trimmed when the producer reports the broker's
//!   ack ([`ProducerRing::take_done`], also the `produce_acked` hop). Producing never waits for
//!   the disk. At startup the records the broker may not have (at or above the persisted trim
//!   watermark) are produced again before anything new: a kill -9 of the edge loses nothing it
//!   had handed to the bridge; duplicates are the few records acknowledged just before the
//!   crash. A replayed `Route` goes to the global producer and its route topic (held, never
//!   dropped, when no global bus is configured).
//! - the **producer thread** ([`KafkaProducer`], acks=all, idempotent, lz4, linger) ships the
//!   frames. A full ring does not stop the bridge: it keeps taking requests (their messages go
//!   to the outbox at once) and holds the frames in order, up to `outbox_max_bytes` of
//!   not-acknowledged messages. At that bound, or when the oldest is `bus_stall_ms` old, the
//!   [`AcceptGate`] shared with the shards stalls: they stop reading their clients and tell each
//!   sending connection once (`0xFF RATE_LIMITED`); at the bound the bridge also stops taking
//!   requests, so the shards' queues hold the rest. Memory stays bounded, nothing accepted is
//!   dropped, and reading resumes by itself when the broker acknowledges again.
//! - the **consumer thread** ([`KafkaConsumer::start_assigned`]: fixed partitions, offsets kept
//!   under group `iris-edge-{region}-{node}`, no rebalancing, so a restarted edge reads at once)
//!   reads this edge's inbox `iris.{region}.edge.{node}` and every partition of the region's
//!   presence topic; the bridge
//!   validates each record in place ([`decode_counted`]: a bad or unknown-version frame is
//!   counted, logged once and skipped) and hands it to the shard that owns it: a routed
//!   `Deliver` or `Relay` and a `Presence` to the user's presence owner, a `DrainChunk` or
//!   `PrekeyBundle` to the shard named in it, an `EdgeReset` to every shard.
//!
//! Protocol v2: a [`CoreRequest::Store`] with a client message id (`client`) becomes a
//! `Deliver` whose `confirm` names this node, run, shard and connection. The recipient's home
//! core answers a `Confirmed` on this edge's inbox once the message is durable there (its
//! window fsynced; a resend of the same `(sender, client)` through any edge of the region is
//! confirmed with the first id and neither stored nor routed again); the bridge hands it to the
//! named shard as [`CoreReply::Confirms`], which answers SEND_ACK and routes the live copy. A
//! `Confirmed` of an earlier run of this node is ignored (connection numbers restart with the
//! process; the client resends after its reconnect and gets the first id). Drain answers carry
//! each message's sender and v2 kind, as the core's `DrainChunk` does. A drain request carrying
//! a v2 HELLO's `resume_after` is preceded by one `Ack` per id it acknowledges
//! ([`crate::resume`]: the ids written to that user's last session on this edge, kept here from
//! its [`CoreRequest::Delivered`]), on the same partition.
//!
//! At startup the link creates the missing topics, learns the deliver and presence topics' real
//! partition counts, and announces an `EdgeReset` for its node (the sessions a previous run of
//! this node announced are gone). A [`TopicKeeper`] thread checks every 2 s that the node's
//! topics still exist and re-creates them if the broker lost them (a restart with memory
//! storage).
//!
//! **Lost topics.** librdkafka (2.12) cannot follow a topic re-created under the same name: its
//! consumer crashes (SIGSEGV), fetches nothing after a seek, or hangs when destroyed (see
//! [`crate::service`]). So the link does not try: [`RemoteCore::lost_topics`] reports the
//! deliver, presence or inbox topic the keeper re-created, the edge then stops like at SIGTERM
//! (the shards hand what they read to the bridge) but ends with [`RemoteCore::stop_for_restart`]:
//! the bridge writes every request into the outbox, the outbox is closed (fsynced), and nothing
//! of librdkafka is destroyed; `iris-edge` exits with status 75 for its supervisor to restart
//! it. The restarted edge replays the outbox (nothing accepted is lost) and its new consumer
//! reads the new logs from their beginning (the memory broker lost the committed offsets too;
//! an old position committed into the new log by a process that still read the old one is not
//! followed past the log's end, [`iris_bus::kafka::start_offsets`]).
//! The edge's inbox topic is created by that edge alone, so its keeper is the one that finds it
//! missing after a broker lost everything, even when another process re-created the shared
//! deliver and presence topics first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Select, Sender, TryRecvError, TrySendError};
use iris_bus::home::Homes;
use iris_bus::hops::{HopHistogram, HopSnapshot};
use iris_bus::kafka::{
    ensure_topics, ensure_topics_within, topic_partitions, Done, InFrame, KafkaConfig,
    KafkaConsumer, KafkaProducer, OutFrame, ProducerRing, ProducerStats, RecreationCursor,
    TopicKeeper, NO_TICKET,
};
use iris_bus::{
    decode_counted, encode, topics, Ack, ArchivedBusFrame, BusFrame, ConfirmTo, Deliver,
    DrainRequest, EdgeReset, FrameCounts, FrameStats, PrekeyFetch, PrekeyPut, Presence, Relay,
    RelayKind, Route, Routed,
};
use tracing::{debug, error, info, warn};

use crate::api::{
    Confirm, Confirmed, CoreReply, CoreRequest, DrainedMsg, ShardBell, ShardLink, RESUME_IDS_MAX,
};
use crate::resume::ResumeLists;

/// The bound of the resume lists was hit (logged once).
static RESUME_EVICTION_LOGGED: AtomicBool = AtomicBool::new(false);
use crate::error::CoreError;
use crate::outbox::{AcceptGate, Outbox, OutboxConfig, OutboxSnapshot, OutboxStats};
use crate::sessions::{
    SessionConfig, SessionMetricsSnapshot, SessionOp, SessionSink, SessionWriter,
};

/// Frames for the global bus held in memory (its ring full: the global brokers away or slow)
/// beyond which the edge stops accepting. Below it, a global bus outage does not stop the
/// region's own traffic.
const GLOBAL_HELD_MAX: usize = 65_536;

/// How often the topic keeper checks that this edge's topics still exist.
const KEEPER_EVERY: Duration = Duration::from_secs(2);

/// How long the start waits for the global brokers before going on without the route topics
/// (the topic keeper creates them when the global bus answers).
const GLOBAL_ENSURE_WAIT: Duration = Duration::from_secs(10);

/// Requests the bridge takes from one shard before looking at the next.
const TAKE_BUDGET: usize = 512;
/// Inbound records the bridge handles before looking at the shards again.
const INBOUND_BUDGET: usize = 1024;
/// Replies held for shards whose queue is full, beyond which the bridge stops taking records
/// from the consumer (which then stops fetching).
const DEFERRED_HIGH: usize = 16_384;

/// What the cluster link needs.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Kafka bootstrap servers, `host:port[,...]`.
    pub brokers: String,
    /// Redis URL of the session store, `redis://host:port`.
    pub redis_url: String,
    /// This edge's region ([`topics::is_valid_region`]).
    pub region: String,
    /// This edge's node id in the region (names its inbox topic).
    pub node: u32,
    /// Partitions of the deliver and presence topics when this edge creates them.
    pub partitions: u32,
    /// Capacity of each shard's request and reply queue.
    pub queue_capacity: usize,
    /// Producer settings (brokers and client id are taken from the fields above).
    pub kafka: KafkaConfig,
    /// The durable outbox (write-ahead log) of accepted messages, under the edge's data dir.
    pub outbox: OutboxConfig,
    /// The region list, this region's place in it and the home table.
    pub homes: Arc<iris_bus::home::Homes>,
    /// The global bus (cross-region route topics): `Some` exactly when `homes` lists more than
    /// one region.
    pub global: Option<KafkaConfig>,
    /// Called on the bridge thread and on the session writer's thread once each has been idle
    /// for [`crate::idle::IDLE_HOOK_AFTER`], once per idle period ([`crate::idle`]): the edge
    /// passes its allocator's collection, so that what a login burst's session writes and
    /// bus frames freed on those threads goes back to the OS. None: nothing runs.
    pub idle_hook: Option<fn()>,
}

/// Counters of the link (monotonic).
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Frames handed to the producer.
    pub frames_out: AtomicU64,
    /// Records taken from the consumer (good or bad).
    pub frames_in: AtomicU64,
    /// Times the producer ring was full and the bridge held a frame.
    pub ring_full: AtomicU64,
    /// Replies that waited for room in a shard's queue.
    pub replies_deferred: AtomicU64,
    /// Session writes that waited for room in the session writer's queue.
    pub session_deferred: AtomicU64,
    /// Inbound frames for another node or of a kind an edge does not take (ignored).
    pub ignored: AtomicU64,
    /// Requests the bus cannot carry (encoding failed): counted and dropped.
    pub encode_errors: AtomicU64,
    /// Acks produced for stored messages a v2 HELLO's `resume_after` acknowledged.
    pub resume_acked: AtomicU64,
    /// Users whose delivered-ids list was forgotten because more than
    /// [`crate::resume::RESUME_USERS_MAX`] users had one.
    pub resume_lists_evicted: AtomicU64,
}

/// Frames handed to the global producer, per target (home) region, in the order of the
/// region list.
#[derive(Debug)]
pub struct RoutedOut {
    regions: Vec<String>,
    counts: Vec<AtomicU64>,
}

impl RoutedOut {
    fn new(homes: &Homes) -> RoutedOut {
        let regions = if homes.is_multi() {
            homes.regions().to_vec()
        } else {
            Vec::new()
        };
        let counts = regions.iter().map(|_| AtomicU64::new(0)).collect();
        RoutedOut { regions, counts }
    }

    fn add(&self, region: &str) {
        if let Some(i) = self.regions.iter().position(|r| r == region) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        self.regions
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (r.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A point-in-time copy of everything the link counts, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct RemoteSnapshot {
    pub frames_out: u64,
    pub frames_in: u64,
    pub ring_full: u64,
    pub replies_deferred: u64,
    pub session_deferred: u64,
    pub ignored: u64,
    pub encode_errors: u64,
    pub resume_acked: u64,
    pub resume_lists_evicted: u64,
    pub frames: FrameCounts,
    /// Both producers summed (regional and, when configured, global).
    pub producer: ProducerStats,
    /// The global producer alone (default when single-region).
    pub global_producer: ProducerStats,
    /// Frames sent to the global bus per target region (`iris_edge_routed_out_total`); one
    /// entry per configured region, empty when single-region.
    pub routed_out: Vec<(String, u64)>,
    /// Routed outbox records replayed while no global bus is configured: held, never dropped.
    pub routes_parked: u64,
    pub sessions: SessionMetricsSnapshot,
    /// The outbox: not-acknowledged records and bytes, age, segments, fsyncs, replays, stalls.
    pub outbox: OutboxSnapshot,
    /// Message accepted → broker acknowledged (hop `produce_acked`).
    pub produce_acked: HopSnapshot,
    /// A message minted in another region (its id's region index), accepted there → in this
    /// edge's inbox (hop `cross_region`): the cross-region end-to-end latency up to this edge.
    pub cross_region: HopSnapshot,
}

/// Reads the link's counters from any thread.
#[derive(Clone)]
pub struct RemoteMetrics {
    stats: Arc<RemoteStats>,
    frames: Arc<FrameStats>,
    producer: Arc<dyn Fn() -> ProducerStats + Send + Sync>,
    global_producer: Arc<dyn Fn() -> ProducerStats + Send + Sync>,
    routed_out: Arc<RoutedOut>,
    routes_parked: Arc<AtomicU64>,
    sessions: Arc<dyn Fn() -> SessionMetricsSnapshot + Send + Sync>,
    outbox: Arc<OutboxStats>,
    produce_acked: Arc<HopHistogram>,
    cross_region: Arc<HopHistogram>,
}

impl std::fmt::Debug for RemoteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMetrics").finish_non_exhaustive()
    }
}

impl RemoteMetrics {
    pub fn snapshot(&self) -> RemoteSnapshot {
        let s = &self.stats;
        let global_producer = (self.global_producer)();
        RemoteSnapshot {
            frames_out: s.frames_out.load(Ordering::Relaxed),
            frames_in: s.frames_in.load(Ordering::Relaxed),
            ring_full: s.ring_full.load(Ordering::Relaxed),
            replies_deferred: s.replies_deferred.load(Ordering::Relaxed),
            session_deferred: s.session_deferred.load(Ordering::Relaxed),
            ignored: s.ignored.load(Ordering::Relaxed),
            encode_errors: s.encode_errors.load(Ordering::Relaxed),
            resume_acked: s.resume_acked.load(Ordering::Relaxed),
            resume_lists_evicted: s.resume_lists_evicted.load(Ordering::Relaxed),
            frames: self.frames.counts(),
            producer: sum_producer(&(self.producer)(), &global_producer),
            global_producer,
            routed_out: self.routed_out.snapshot(),
            routes_parked: self.routes_parked.load(Ordering::Relaxed),
            sessions: (self.sessions)(),
            outbox: self.outbox.snapshot(),
            produce_acked: self.produce_acked.snapshot(),
            cross_region: self.cross_region.snapshot(),
        }
    }

    /// False once the outbox could not write or fsync: the edge accepts nothing more.
    pub fn outbox_healthy(&self) -> bool {
        !self.outbox.failed.load(Ordering::Relaxed)
    }
}

/// Two producers' counters added up.
fn sum_producer(a: &ProducerStats, b: &ProducerStats) -> ProducerStats {
    ProducerStats {
        frames_in: a.frames_in + b.frames_in,
        produced_ok: a.produced_ok + b.produced_ok,
        delivery_errors: a.delivery_errors + b.delivery_errors,
        rejected: a.rejected + b.rejected,
        queue_full_events: a.queue_full_events + b.queue_full_events,
        in_flight: a.in_flight + b.in_flight,
        pending: a.pending + b.pending,
        ring_full: a.ring_full + b.ring_full,
        client_errors: a.client_errors + b.client_errors,
    }
}

fn producer_stats(p: &Arc<Mutex<Option<KafkaProducer>>>) -> ProducerStats {
    p.lock()
        .ok()
        .and_then(|g| g.as_ref().map(KafkaProducer::stats))
        .unwrap_or_default()
}

/// What [`RemoteCore::shutdown`] left behind.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    /// The producer's counters at the end.
    pub producer: ProducerStats,
    /// Accepted records the broker had not acknowledged: they stay, fsynced, in the outbox and
    /// are produced by the next start.
    pub left_in_outbox: u64,
}

/// The running link: bridge, producer, consumer and session writer threads.
pub struct RemoteCore {
    stop: Arc<AtomicBool>,
    bridge: Option<JoinHandle<(Outbox, ProducerRing, Option<ProducerRing>)>>,
    producer: Arc<Mutex<Option<KafkaProducer>>>,
    /// The producer on the global brokers (route topics), when multi-region.
    global_producer: Arc<Mutex<Option<KafkaProducer>>>,
    consumer: Option<KafkaConsumer>,
    sessions: Option<SessionWriter>,
    /// Re-creates this edge's topics when the broker lost them (a restart with memory storage).
    keeper: Option<TopicKeeper>,
    /// Which of this edge's topics the keeper re-created since [`RemoteCore::lost_topics`] last
    /// looked.
    recreations: RecreationCursor,
    /// The same for the route topics on the global brokers.
    global_keeper: Option<TopicKeeper>,
    metrics: RemoteMetrics,
}

impl std::fmt::Debug for RemoteCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCore").finish_non_exhaustive()
    }
}

impl RemoteCore {
    /// Creates the missing topics, starts the threads and returns one link per shard.
    ///
    /// Fails when the region name is invalid, the broker does not answer within 30 s, or a
    /// client or thread cannot be created. Redis need not be up: session writes wait for it.
    pub fn start(
        cfg: RemoteConfig,
        shards: usize,
    ) -> Result<(RemoteCore, Vec<ShardLink>), CoreError> {
        if !topics::is_valid_region(&cfg.region) {
            return Err(CoreError::InvalidInput(format!(
                "invalid region name {:?}",
                cfg.region
            )));
        }
        let shards = shards.max(1);
        // The outbox first: what a previous run accepted and the broker may not have goes out
        // before anything this run accepts.
        let (outbox, replayed) = Outbox::open(cfg.outbox.clone()).map_err(|e| {
            CoreError::Io(std::io::Error::other(format!(
                "cannot open the outbox: {e}"
            )))
        })?;
        let kafka = KafkaConfig {
            brokers: cfg.brokers.clone(),
            client_id: format!("iris-edge-{}-{}", cfg.region, cfg.node),
            ..cfg.kafka.clone()
        };
        let parts = cfg.partitions.max(1) as i32;
        let deliver_topic = topics::deliver(&cfg.region);
        let presence_topic = topics::presence(&cfg.region);
        let inbox_topic = topics::edge_inbox(&cfg.region, cfg.node);
        let own_topics = vec![
            (deliver_topic.clone(), parts),
            (presence_topic.clone(), parts),
            (inbox_topic.clone(), 1),
        ];
        ensure_topics(&kafka, &own_topics)?;
        let keeper = TopicKeeper::start(&kafka, own_topics, KEEPER_EVERY)?;
        let recreations = RecreationCursor::new(
            keeper.recreations(),
            &[&deliver_topic, &presence_topic, &inbox_topic],
        );
        let wait = Duration::from_secs(30);
        let deliver_parts = topic_partitions(&kafka, &deliver_topic, wait)?;
        let presence_parts = topic_partitions(&kafka, &presence_topic, wait)?;

        let (writer, mut sinks) = SessionWriter::start(
            SessionConfig {
                idle_hook: cfg.idle_hook,
                ..SessionConfig::with_url(cfg.redis_url.clone())
            },
            1,
        )?;
        let sink = sinks.pop().ok_or(CoreError::ThreadPanicked)?;
        let (producer, mut rings) = KafkaProducer::start(&kafka, 1)?;
        let ring = rings.pop().ok_or(CoreError::ThreadPanicked)?;
        let producer = Arc::new(Mutex::new(Some(producer)));

        // The global bus: one producer ring on the global brokers, the route topic of every
        // region of the list created (by whoever starts first) and kept.
        let global_parts = cfg.partitions.max(1);
        let mut global_keeper = None;
        let mut global_ring = None;
        let global_producer = Arc::new(Mutex::new(None));
        match (&cfg.global, cfg.homes.is_multi()) {
            (Some(g), true) => {
                let gk = KafkaConfig {
                    client_id: format!("iris-edge-{}-{}-global", cfg.region, cfg.node),
                    ..g.clone()
                };
                let route_topics: Vec<(String, i32)> = cfg
                    .homes
                    .regions()
                    .iter()
                    .map(|r| (topics::route(r), global_parts as i32))
                    .collect();
                if let Err(e) = ensure_topics_within(&gk, &route_topics, GLOBAL_ENSURE_WAIT) {
                    // Not fatal: routed frames wait in the producer (and the outbox) and the
                    // keeper creates the topics once the global brokers answer.
                    warn!(
                        error = %e,
                        brokers = %gk.brokers,
                        "global bus not reachable at start; route topics are created when it answers"
                    );
                }
                global_keeper = Some(TopicKeeper::start(&gk, route_topics, KEEPER_EVERY)?);
                let (p, mut rings) = KafkaProducer::start(&gk, 1)?;
                global_ring = Some(rings.pop().ok_or(CoreError::ThreadPanicked)?);
                if let Ok(mut slot) = global_producer.lock() {
                    *slot = Some(p);
                }
            }
            (None, true) => error!(
                region = %cfg.region,
                "several regions configured without a global bus: frames for users homed elsewhere are held, not sent"
            ),
            _ => {}
        }

        let cap = cfg.queue_capacity.max(1);
        let gate = Arc::new(AcceptGate::default());
        let mut links = Vec::with_capacity(shards);
        let mut requests = Vec::with_capacity(shards);
        let mut replies = Vec::with_capacity(shards);
        let mut bells = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (req_tx, req_rx) = channel::bounded(cap);
            let (rep_tx, rep_rx) = channel::bounded(cap);
            let bell = Arc::new(ShardBell::default());
            links.push(ShardLink {
                to_core: req_tx,
                from_core: rep_rx,
                bell: Arc::clone(&bell),
                wake_core: None,
                gate: Arc::clone(&gate),
            });
            requests.push(req_rx);
            replies.push(rep_tx);
            bells.push(bell);
        }

        let (in_tx, in_rx) = channel::bounded::<InFrame>(4096);
        // Fixed partitions, no group rebalancing: a restarted edge reads at once.
        let mut assigned = vec![(inbox_topic.clone(), 0)];
        assigned.extend((0..presence_parts as i32).map(|p| (presence_topic.clone(), p)));
        let consumer = KafkaConsumer::start_assigned(
            &kafka,
            &format!("iris-edge-{}-{}", cfg.region, cfg.node),
            &assigned,
            vec![in_tx],
            |_, _| 0,
        )?;
        // A re-created topic is not followed in place: see the module doc, "Lost topics".

        let stats = Arc::new(RemoteStats::default());
        let frames = Arc::new(FrameStats::new());
        let stop = Arc::new(AtomicBool::new(false));
        let outbox_stats = outbox.stats();
        let produce_acked = Arc::new(HopHistogram::default());
        let cross_region = Arc::new(HopHistogram::default());
        let deliver_topic_arc: Arc<str> = Arc::from(deliver_topic.as_str());
        let routed_out = Arc::new(RoutedOut::new(&cfg.homes));
        let routes_parked = Arc::new(AtomicU64::new(0));
        let mut route_topics: std::collections::HashMap<String, Arc<str>> =
            std::collections::HashMap::new();
        // Replayed records are produced first, in sequence order per ring, tracked like new
        // ones: a `Route` goes again to the global bus and its region's route topic, the rest to
        // the deliver topic.
        let mut held = VecDeque::new();
        let mut global_held = VecDeque::new();
        let mut parked = VecDeque::new();
        for r in replayed {
            match r.route_region() {
                Some(region) => {
                    let topic = Arc::clone(
                        route_topics
                            .entry(region.clone())
                            .or_insert_with(|| Arc::from(topics::route(&region).as_str())),
                    );
                    let out = OutFrame {
                        topic,
                        partition: topics::partition_of(&r.key, global_parts) as i32,
                        key: (!r.key.is_empty()).then_some(r.key),
                        payload: r.frame,
                        ticket: r.seq,
                    };
                    if global_ring.is_some() {
                        routed_out.add(&region);
                        global_held.push_back(out);
                    } else {
                        parked.push_back(out);
                    }
                }
                None => held.push_back(OutFrame {
                    topic: Arc::clone(&deliver_topic_arc),
                    partition: topics::partition_of(&r.key, deliver_parts) as i32,
                    key: (!r.key.is_empty()).then_some(r.key),
                    payload: r.frame,
                    ticket: r.seq,
                }),
            }
        }
        if !parked.is_empty() {
            routes_parked.store(parked.len() as u64, Ordering::Relaxed);
            error!(
                records = parked.len(),
                "outbox holds frames for other regions but no global bus is configured: they are kept, not sent (configure global_brokers and restart)"
            );
        }
        // This run of the node: its session writes carry it, and it is the reset's time.
        let run = unix_ms();
        let mut bridge = Bridge {
            node: cfg.node,
            run,
            inboxes: std::collections::HashMap::new(),
            region: cfg.region.clone(),
            deliver_topic: deliver_topic_arc,
            presence_topic: Arc::from(presence_topic.as_str()),
            deliver_parts,
            presence_parts,
            requests,
            replies,
            bells,
            deferred: (0..shards).map(|_| VecDeque::new()).collect(),
            deferred_total: 0,
            inbound: in_rx,
            ring,
            held: VecDeque::new(),
            homes: Arc::clone(&cfg.homes),
            global: global_ring.map(|ring| GlobalOut {
                ring,
                held: global_held,
                topics: route_topics,
                parts: global_parts,
            }),
            parked,
            routes_parked: Arc::clone(&routes_parked),
            routed_out: Arc::clone(&routed_out),
            outbox,
            done: Vec::new(),
            gate,
            produce_acked: Arc::clone(&produce_acked),
            cross_region: Arc::clone(&cross_region),
            own_region_index: cfg.homes.own_index(),
            stalled_since: None,
            held_since: None,
            stall: Duration::from_millis(cfg.outbox.stall_ms),
            sink,
            session_backlog: VecDeque::new(),
            stats: Arc::clone(&stats),
            frames: Arc::clone(&frames),
            stop: Arc::clone(&stop),
            resume: ResumeLists::default(),
            idle: crate::idle::IdleHook::new(cfg.idle_hook),
        };
        // Announce this node's (re)start before any of its sessions.
        bridge.produce(BusFrame::EdgeReset(EdgeReset {
            node: cfg.node,
            unix_ms: run,
        }));
        bridge.held.extend(held);
        let thread = std::thread::Builder::new()
            .name("iris-bus-bridge".to_owned())
            .spawn(move || {
                bridge.run();
                (bridge.outbox, bridge.ring, bridge.global.map(|g| g.ring))
            })?;
        info!(
            region = %cfg.region,
            node = cfg.node,
            deliver_partitions = deliver_parts,
            presence_partitions = presence_parts,
            inbox = %inbox_topic,
            "cluster link started"
        );
        let p = Arc::clone(&producer);
        let gp = Arc::clone(&global_producer);
        let session_metrics = Arc::clone(writer.metrics());
        let metrics = RemoteMetrics {
            stats,
            frames,
            producer: Arc::new(move || producer_stats(&p)),
            global_producer: Arc::new(move || producer_stats(&gp)),
            routed_out,
            routes_parked,
            sessions: Arc::new(move || session_metrics.snapshot()),
            outbox: outbox_stats,
            produce_acked,
            cross_region,
        };
        Ok((
            RemoteCore {
                keeper: Some(keeper),
                recreations,
                global_keeper,
                stop,
                bridge: Some(thread),
                producer,
                global_producer,
                consumer: Some(consumer),
                sessions: Some(writer),
                metrics,
            },
            links,
        ))
    }

    /// The link's counters, readable from any thread.
    pub fn metrics(&self) -> RemoteMetrics {
        self.metrics.clone()
    }

    /// This edge's topics (deliver, presence, inbox) the keeper re-created since the last call:
    /// the broker lost them (a memory-storage restart). Not empty means the link cannot go on:
    /// stop the shards and call [`Self::stop_for_restart`], then exit for a restart (see the
    /// module doc, "Lost topics"). One atomic load when nothing was re-created.
    pub fn lost_topics(&mut self) -> Vec<String> {
        self.recreations.take()
    }

    /// Call after the shards stopped: hands everything they queued to the producer, flushes it
    /// for at most `flush`, stops the consumer and writes the pending sessions. Whatever the
    /// broker has not acknowledged by then stays in the outbox, fsynced, for the next start.
    ///
    /// Fails when something accepted could be neither produced nor kept: the outbox could not
    /// write or fsync (or a thread died).
    pub fn shutdown(self, flush: Duration) -> Result<ShutdownReport, CoreError> {
        self.stop_inner(flush, false)
    }

    /// The stop after [`Self::lost_topics`] reported lost topics, to be followed by the
    /// process's exit (`iris-edge` exits with status 75): like [`Self::shutdown`], every
    /// request the shards queued goes into the outbox, which is closed (fsynced), and the
    /// pending session writes are made; but the producers are not flushed (the outbox keeps
    /// every accepted message for the next start) and no librdkafka handle is destroyed
    /// (destroying a client that saw its topic re-created can hang): they are leaked for the
    /// exit to end.
    pub fn stop_for_restart(self) -> Result<ShutdownReport, CoreError> {
        self.stop_inner(Duration::ZERO, true)
    }

    fn stop_inner(mut self, flush: Duration, restart: bool) -> Result<ShutdownReport, CoreError> {
        self.stop.store(true, Ordering::Release);
        for k in [self.keeper.take(), self.global_keeper.take()]
            .into_iter()
            .flatten()
        {
            if restart {
                std::mem::forget(k);
            } else {
                k.stop();
            }
        }
        let joined = match self.bridge.take() {
            Some(t) => Some(t.join().map_err(|_| CoreError::ThreadPanicked)?),
            None => None,
        };
        let mut report = ShutdownReport::default();
        let producer = self.producer.lock().ok().and_then(|mut g| g.take());
        let global = self.global_producer.lock().ok().and_then(|mut g| g.take());
        let mut stats = ProducerStats::default();
        for p in [producer, global].into_iter().flatten() {
            if restart {
                stats = sum_producer(&stats, &p.stats());
                std::mem::forget(p);
                continue;
            }
            match p.flush_and_stop(flush) {
                Ok(s) => stats = sum_producer(&stats, &s),
                Err(e) => info!(
                    error = %e,
                    "kafka producer not flushed at shutdown; the outbox keeps what was accepted"
                ),
            }
        }
        report.producer = stats;
        let mut result = Ok(());
        if let Some((mut outbox, ring, global_ring)) = joined {
            let mut done = Vec::new();
            ring.take_done(&mut done);
            if let Some(g) = &global_ring {
                g.take_done(&mut done);
            }
            for d in done {
                if let Some(id) = outbox.done(d.ticket, d.acked) {
                    if d.acked && id != 0 {
                        self.metrics.produce_acked.record_id(id);
                    }
                }
            }
            match outbox.close() {
                Ok(left) => {
                    report.left_in_outbox = left;
                    info!(
                        left_in_outbox = left,
                        "outbox closed; records not acknowledged are produced by the next start"
                    );
                }
                Err(e) => {
                    error!(error = %e, "outbox not closed cleanly: accepted messages may be lost");
                    result = Err(CoreError::Io(std::io::Error::other(e.to_string())));
                }
            }
        }
        // The consumer commits its offsets synchronously when it stops, which waits as long as
        // the broker does not answer: bounded here (uncommitted inbox offsets only mean frames
        // consumed again, and duplicates of routed messages are dropped).
        if restart {
            // Leaked with the process (see `stop_for_restart`).
            std::mem::forget(self.consumer.take());
        } else if let Some(c) = self.consumer.take() {
            let (tx, rx) = std::sync::mpsc::channel();
            let stopper = std::thread::Builder::new()
                .name("iris-consumer-stop".to_owned())
                .spawn(move || {
                    let _ = tx.send(c.stop());
                });
            match stopper.map(|_| rx.recv_timeout(flush.max(Duration::from_secs(1)))) {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warn!(error = %e, "kafka consumer did not stop cleanly"),
                Ok(Err(_)) => warn!("kafka consumer did not stop in time (broker not answering)"),
                Err(e) => warn!(error = %e, "kafka consumer not stopped"),
            }
        }
        if let Some(w) = self.sessions.take() {
            w.shutdown()?;
        }
        result.map(|()| report)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The bridge thread's state.
struct Bridge {
    node: u32,
    /// This run of the node (its start, Unix ms; the `EdgeReset` it announced).
    run: u64,
    region: String,
    deliver_topic: Arc<str>,
    presence_topic: Arc<str>,
    /// Inbox topic names of the other edges, by node (direct copies).
    inboxes: std::collections::HashMap<u32, Arc<str>>,
    deliver_parts: u32,
    presence_parts: u32,
    requests: Vec<Receiver<CoreRequest>>,
    replies: Vec<Sender<CoreReply>>,
    /// Rung after replies were queued for a shard.
    bells: Vec<Arc<ShardBell>>,
    /// Replies waiting for room in each shard's queue, in order.
    deferred: Vec<VecDeque<CoreReply>>,
    deferred_total: usize,
    inbound: Receiver<InFrame>,
    ring: ProducerRing,
    /// Frames the producer ring had no room for, in order (at startup: the outbox's replay).
    held: VecDeque<OutFrame>,
    /// The region list and the home table: who is homed here.
    homes: Arc<Homes>,
    /// The global bus (route topics), when multi-region and configured.
    global: Option<GlobalOut>,
    /// Routed frames with no global bus to go to (replayed from the outbox, or multi-region
    /// without `global_brokers`): kept, in order, never dropped (their outbox records stay).
    parked: VecDeque<OutFrame>,
    routes_parked: Arc<AtomicU64>,
    routed_out: Arc<RoutedOut>,
    /// Every `Deliver` and `PrekeyPut` until the broker acknowledged it.
    outbox: Outbox,
    /// Reports of the producer, taken each pass.
    done: Vec<Done>,
    /// Tells the shards to stop reading their clients (outbox bound, age or failure).
    gate: Arc<AcceptGate>,
    produce_acked: Arc<HopHistogram>,
    /// Age at arrival of messages minted in another region.
    cross_region: Arc<HopHistogram>,
    /// This region's index in the region list (in every id it mints).
    own_region_index: u32,
    /// When the current stall began.
    stalled_since: Option<Instant>,
    /// Since when `held` is not empty without progress (the broker takes no frames at all:
    /// acks and other frames that are not in the outbox stall the gate too after `stall`).
    held_since: Option<Instant>,
    stall: Duration,
    sink: SessionSink,
    session_backlog: VecDeque<SessionOp>,
    stats: Arc<RemoteStats>,
    frames: Arc<FrameStats>,
    stop: Arc<AtomicBool>,
    /// The ids written to each user's last v2 session on this edge, for `resume_after`.
    resume: ResumeLists,
    /// See [`RemoteConfig::idle_hook`].
    idle: crate::idle::IdleHook,
}

/// The bridge's side of the global bus: its own producer ring and held queue (order is kept per
/// ring), the route topic names and their partition count.
struct GlobalOut {
    ring: ProducerRing,
    held: VecDeque<OutFrame>,
    topics: std::collections::HashMap<String, Arc<str>>,
    parts: u32,
}

impl Bridge {
    fn run(&mut self) {
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let moved = self.flush_held();
            let mut busy = moved;
            busy |= self.flush_sessions();
            busy |= self.take_done() > 0;
            // Requests are taken (and their messages written to the outbox) even while the
            // producer ring is full, so what a shard read is on disk at once; `held` is bounded
            // by the outbox's byte bound: past it the shards' requests wait in their queues
            // and the shards stop reading (the gate). At stop the shards are gone: take all.
            if stopping || !self.outbox.over_bytes() {
                for s in 0..self.requests.len() {
                    busy |= self.take_from(s, TAKE_BUDGET, !stopping) > 0;
                }
            }
            busy |= self.flush_deferred();
            if self.deferred_total < DEFERRED_HIGH {
                busy |= self.take_inbound() > 0;
            }
            self.commit_outbox(moved);
            // Held frames need not wait for a stalled broker: the messages among them are in
            // the outbox; `finish` gives the others a short while.
            if stopping && !busy && self.all_requests_empty() {
                self.finish();
                return;
            }
            self.idle.note(busy, Instant::now());
            if !busy {
                self.wait();
            }
        }
    }

    /// At stop: the shards are gone; give what they queued a short while to reach the producer
    /// ring (the producer keeps retrying while it runs) and the session writer. Messages that
    /// do not are in the outbox.
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(self.held_len() == 0 && self.session_backlog.is_empty())
            && Instant::now() < deadline
        {
            self.flush_held();
            self.flush_sessions();
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.held_len() > 0 {
            warn!(
                frames = self.held_len(),
                "producer ring still full at shutdown; these frames were not sent (the messages among them stay in the outbox)"
            );
        }
    }

    /// Writes what this pass appended to the outbox (its fsync is the sync thread's), persists
    /// the watermark now and then and opens or closes the accept gate. `moved`: held frames went
    /// to the producer ring in this pass.
    fn commit_outbox(&mut self, moved: bool) {
        // A failure is logged and marked by the outbox; the gate below stops accepting.
        let _ = self.outbox.write_pending();
        self.outbox.tick();
        // Only the regional ring's backlog stalls by age: frames for the global bus wait (on
        // disk in the outbox, in memory here) while it is away, up to GLOBAL_HELD_MAX.
        if self.held.is_empty() {
            self.held_since = None;
        } else if moved || self.held_since.is_none() {
            self.held_since = Some(Instant::now());
        }
        let global_full = self
            .global
            .as_ref()
            .is_some_and(|g| g.held.len() >= GLOBAL_HELD_MAX);
        let stall = self.outbox.must_stall()
            || global_full
            || self.held_since.is_some_and(|t| t.elapsed() >= self.stall);
        if self.gate.set(stall) {
            self.outbox.stats().stalls.fetch_add(1, Ordering::Relaxed);
            warn!(
                unacked = self.outbox.unacked(),
                unacked_bytes = self.outbox.unacked_bytes(),
                oldest_ms = self.outbox.oldest_age().map_or(0, |a| a.as_millis() as u64),
                failed = self.outbox.failed(),
                "bus stalled: the edge stops reading clients"
            );
            self.stalled_since = Some(Instant::now());
        } else if !stall {
            if let Some(since) = self.stalled_since.take() {
                info!(
                    unacked = self.outbox.unacked(),
                    stalled_ms = since.elapsed().as_millis() as u64,
                    "bus caught up: the edge reads clients again"
                );
            }
        }
    }

    /// Applies the producer's reports to the outbox (trim) and the hop histogram.
    fn take_done(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let mut n = self.ring.take_done(&mut done);
        if let Some(g) = &self.global {
            // Tickets are outbox sequence numbers: unique across both rings.
            n += g.ring.take_done(&mut done);
        }
        for d in done.drain(..) {
            if let Some(id) = self.outbox.done(d.ticket, d.acked) {
                if d.acked && id != 0 {
                    self.produce_acked.record_id(id);
                }
            }
        }
        self.done = done;
        n
    }

    /// Frames held for either producer ring.
    fn held_len(&self) -> usize {
        self.held.len() + self.global.as_ref().map_or(0, |g| g.held.len())
    }

    fn all_requests_empty(&self) -> bool {
        self.requests.iter().all(Receiver::is_empty)
    }

    /// Sleeps until a shard or the consumer has something, or a short while when frames,
    /// replies or session writes wait for room.
    fn wait(&self) {
        if self.held_len() > 0 || self.deferred_total > 0 || !self.session_backlog.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
            return;
        }
        // Acknowledgements arrive from the producer thread, which cannot wake us: look often
        // while records wait for one.
        let timeout = if self.outbox.unacked() > 0 {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        };
        let mut sel = Select::new();
        for rx in &self.requests {
            sel.recv(rx);
        }
        sel.recv(&self.inbound);
        let _ = sel.ready_timeout(timeout);
    }

    /// Takes up to `budget` requests of shard `s`; stops early at the outbox's byte bound when
    /// `bounded`.
    fn take_from(&mut self, s: usize, budget: usize, bounded: bool) -> usize {
        let mut n = 0;
        while n < budget && !(bounded && self.outbox.over_bytes()) {
            match self.requests[s].try_recv() {
                Ok(req) => {
                    n += 1;
                    self.outbound(s, req);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        n
    }

    /// Turns one shard request into bus frames and session writes.
    fn outbound(&mut self, shard: usize, req: CoreRequest) {
        match req {
            // A v2 SEND (`client`: its client message id) asks the recipient's home core for a
            // `Confirmed`, which comes back to this shard and connection (of this run).
            CoreRequest::Store {
                msg: m,
                conn,
                client,
                accepted: _,
            } => {
                let home = self.elsewhere(&m.recipient);
                let confirm = client.map(|client| {
                    Box::new(ConfirmTo {
                        client,
                        node: self.node,
                        shard: shard as u32,
                        conn,
                        run: self.run,
                    })
                });
                let deliver = Deliver {
                    id: m.id,
                    recipient: m.recipient,
                    sender: m.sender,
                    payload: m.payload,
                    origin: self.region.clone(),
                    kind: m.kind,
                    confirm,
                };
                match home {
                    Some(home) => self.produce_durable(m.id, route(home, Routed::Deliver(deliver))),
                    None => self.produce_durable(m.id, BusFrame::Deliver(deliver)),
                }
            }
            // A roaming user acks at its home, where its messages are stored.
            CoreRequest::Ack { user, id } => match self.elsewhere(&user) {
                Some(home) => self.produce(route(home, Routed::Ack(Ack { user, id }))),
                None => self.produce(BusFrame::Ack(Ack { user, id })),
            },
            CoreRequest::Drain {
                user,
                conn,
                after,
                limit,
                resume_after,
            } => {
                // Everything queued by any shard before this drain goes first (see the module
                // doc); one pass over what is queued right now.
                for other in 0..self.requests.len() {
                    let queued = self.requests[other].len();
                    for _ in 0..queued {
                        match self.requests[other].try_recv() {
                            Ok(r) => self.outbound_not_drain(other, r),
                            Err(_) => break,
                        }
                    }
                }
                self.resume_acks(&user, resume_after);
                self.drain_request(shard, user, conn, after, limit);
            }
            CoreRequest::Delivered { user, mut ids } => {
                // The last ones written, if a sender sent more than the bound.
                ids.drain(..ids.len().saturating_sub(RESUME_IDS_MAX));
                let evicted = self.resume.put(user, ids);
                if evicted > 0 {
                    self.stats
                        .resume_lists_evicted
                        .fetch_add(evicted as u64, Ordering::Relaxed);
                    if !RESUME_EVICTION_LOGGED.swap(true, Ordering::Relaxed) {
                        debug!("resume lists over their bound: the oldest are forgotten");
                    }
                }
            }
            CoreRequest::PutPrekeys { user, bundle } => {
                let put = PrekeyPut { user, bundle };
                match self.elsewhere(&put.user) {
                    Some(home) => self.produce_durable(0, route(home, Routed::PrekeyPut(put))),
                    None => self.produce_durable(0, BusFrame::PrekeyPut(put)),
                }
            }
            CoreRequest::FetchPrekeys { user, conn } => {
                let mut fetch = PrekeyFetch {
                    user,
                    node: self.node,
                    shard: shard as u32,
                    conn,
                    region: String::new(),
                };
                match self.elsewhere(&fetch.user) {
                    // The bundle comes back through the global bus to this region's inbox.
                    Some(home) => {
                        fetch.region = self.region.clone();
                        self.produce(route(home, Routed::PrekeyFetch(fetch)));
                    }
                    None => self.produce(BusFrame::PrekeyFetch(fetch)),
                }
            }
            CoreRequest::Online { user, shard } => {
                let now = unix_ms();
                self.session(SessionOp::Online {
                    user: user.clone(),
                    node: self.node.to_string(),
                    shard: u16::try_from(shard).unwrap_or(u16::MAX),
                    region: self.region.clone(),
                    run: self.run,
                    login_ms: now,
                });
                self.produce(BusFrame::Presence(Presence {
                    user,
                    online: true,
                    node: self.node,
                    shard: shard as u32,
                    unix_ms: now,
                }));
            }
            CoreRequest::Offline { user, last_seen } => {
                self.session(SessionOp::Offline {
                    user: user.clone(),
                    node: self.node.to_string(),
                    region: self.region.clone(),
                    run: self.run,
                    last_seen,
                });
                self.produce(BusFrame::Presence(Presence {
                    user,
                    online: false,
                    node: self.node,
                    shard: shard as u32,
                    unix_ms: last_seen.saturating_mul(1000).max(unix_ms()),
                }));
            }
            CoreRequest::Relay { recipient, frame } => {
                let home = self.elsewhere(&recipient);
                let relay = Relay {
                    recipient,
                    kind: relay_kind(&frame),
                    frame,
                };
                match home {
                    Some(home) => self.produce(route(home, Routed::Relay(relay))),
                    None => self.produce(BusFrame::Relay(relay)),
                }
            }
            // The live copy straight to the recipient's edge. An empty origin marks it direct
            // (the core's copies always carry the accepting region); its sender field carries
            // the sender's previous message id (8 bytes, big-endian) and then the sender's name,
            // see docs/BUS.md.
            CoreRequest::Forward {
                node,
                recipient,
                id,
                prev,
                sender,
                payload,
                kind,
            } => self.produce_inbox(
                node,
                BusFrame::Deliver(Deliver {
                    id,
                    recipient,
                    sender: {
                        let mut s = Vec::with_capacity(8 + sender.len());
                        s.extend_from_slice(&prev.to_be_bytes());
                        s.extend_from_slice(&sender);
                        s
                    },
                    payload,
                    origin: String::new(),
                    kind,
                    confirm: None,
                }),
            ),
            CoreRequest::ForwardRelay {
                node,
                recipient,
                frame,
            } => self.produce_inbox(
                node,
                BusFrame::Relay(Relay {
                    recipient,
                    kind: relay_kind(&frame),
                    frame,
                }),
            ),
        }
    }

    /// [`Self::outbound`] for requests taken in ahead of a drain: a drain among them is handled
    /// like any request, without a nested take-in.
    fn outbound_not_drain(&mut self, shard: usize, req: CoreRequest) {
        match req {
            CoreRequest::Drain {
                user,
                conn,
                after,
                limit,
                resume_after,
            } => {
                self.resume_acks(&user, resume_after);
                self.drain_request(shard, user, conn, after, limit);
            }
            other => self.outbound(shard, other),
        }
    }

    /// A session's first drain with a HELLO's `resume_after`: one `Ack` per id it acknowledges
    /// ([`ResumeLists::take`]), produced before the drain request. Acks and drain requests of a
    /// user share the deliver topic's partition of that user (or the route to its home), so
    /// the core deletes them before it answers the drain. Only this edge's list is known: a
    /// session that resumes on another edge gets its unacked messages again.
    fn resume_acks(&mut self, user: &[u8], resume_after: u64) {
        if resume_after == 0 {
            return;
        }
        let ids = self.resume.take(user, resume_after);
        self.stats
            .resume_acked
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        for id in ids {
            self.outbound(
                0,
                CoreRequest::Ack {
                    user: user.to_vec(),
                    id,
                },
            );
        }
    }

    /// The home region of `user` when it is not this one (`None`: homed here, or a
    /// single-region deployment).
    fn elsewhere(&self, user: &[u8]) -> Option<String> {
        if !self.homes.is_multi() {
            return None;
        }
        let home = self.homes.home_of(user);
        (home != self.region).then(|| home.to_owned())
    }

    /// A login's drain: to this region's cores, or (a roaming user) to its home through the
    /// global bus, naming this region so the chunks come back to this edge's inbox.
    fn drain_request(&mut self, shard: usize, user: Vec<u8>, conn: u64, after: u64, limit: usize) {
        let home = self.elsewhere(&user);
        let mut req = DrainRequest {
            user,
            node: self.node,
            shard: shard as u32,
            conn,
            after,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            region: String::new(),
        };
        match home {
            Some(home) => {
                req.region = self.region.clone();
                self.produce(route(home, Routed::DrainRequest(req)));
            }
            None => self.produce(BusFrame::DrainRequest(req)),
        }
    }

    /// Encodes `frame` for its topic and partition and queues it for the producer.
    fn produce(&mut self, frame: BusFrame) {
        self.produce_ticketed(frame, None);
    }

    /// [`Self::produce`] for what a client sent: the frame goes to the outbox too (its sequence
    /// number is the producer ticket) and is trimmed there on the broker's ack. Producing does
    /// not wait for the write.
    fn produce_durable(&mut self, id: u64, frame: BusFrame) {
        self.produce_ticketed(frame, Some(id));
    }

    fn produce_ticketed(&mut self, frame: BusFrame, durable: Option<u64>) {
        // A route goes to its region's topic on the global bus; everything else is regional.
        let global_region = match &frame {
            BusFrame::Route(r) => Some(r.region.clone()),
            _ => None,
        };
        let (topic, parts) = match (&frame, &global_region) {
            (_, Some(region)) => {
                let parts = self.global.as_ref().map_or(self.deliver_parts, |g| g.parts);
                (self.route_topic(region), parts)
            }
            (BusFrame::Presence(_) | BusFrame::EdgeReset(_), None) => {
                (Arc::clone(&self.presence_topic), self.presence_parts)
            }
            _ => (Arc::clone(&self.deliver_topic), self.deliver_parts),
        };
        let user = frame.key_user();
        let partition = topics::partition_of(user, parts) as i32;
        let key = (!user.is_empty()).then(|| user.to_vec());
        let Some(payload) = self.encode_counted(&frame) else {
            return;
        };
        let ticket = match durable {
            Some(id) => match if global_region.is_some() {
                self.outbox.append_routed(id, user, &payload)
            } else {
                self.outbox.append(id, user, &payload)
            } {
                Ok(seq) => seq,
                // The outbox failed (logged once, the gate stops accepting): produce anyway.
                Err(e) => {
                    debug!(error = %e, "frame not written to the outbox");
                    NO_TICKET
                }
            },
            None => NO_TICKET,
        };
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        let out = OutFrame {
            topic,
            partition,
            key,
            payload,
            ticket,
        };
        match global_region {
            Some(region) => self.queue_global(&region, out),
            None => self.queue_out(out),
        }
    }

    /// The name of `region`'s route topic (kept, not rebuilt per frame).
    fn route_topic(&mut self, region: &str) -> Arc<str> {
        let map = match &mut self.global {
            Some(g) => &mut g.topics,
            None => return Arc::from(topics::route(region).as_str()),
        };
        if let Some(t) = map.get(region) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(topics::route(region).as_str());
        map.insert(region.to_owned(), Arc::clone(&t));
        t
    }

    /// Hands `out` to the producer ring, or holds it (in order) while the ring is full.
    fn queue_out(&mut self, out: OutFrame) {
        let ring = &self.ring;
        if send_in_order(&mut self.held, out, |f| ring.try_send(f)) {
            self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
            debug!("producer ring full, holding frames");
        }
    }

    /// [`Self::queue_out`] for the global producer ring (its own held queue, its own order);
    /// without a global bus the frame is parked (kept, never dropped).
    fn queue_global(&mut self, region: &str, out: OutFrame) {
        let Some(g) = &mut self.global else {
            self.parked.push_back(out);
            self.routes_parked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.routed_out.add(region);
        let ring = &g.ring;
        if send_in_order(&mut g.held, out, |f| ring.try_send(f)) {
            self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
            debug!("global producer ring full, holding frames");
        }
    }

    /// Moves held frames to the producer rings, in order per ring, while they have room.
    fn flush_held(&mut self) -> bool {
        let ring = &self.ring;
        let mut moved = flush_in_order(&mut self.held, |f| ring.try_send(f));
        if let Some(g) = &mut self.global {
            let ring = &g.ring;
            moved |= flush_in_order(&mut g.held, |f| ring.try_send(f));
        }
        moved
    }

    fn session(&mut self, op: SessionOp) {
        let sink = &self.sink;
        if send_in_order(&mut self.session_backlog, op, |o| sink.try_send(o)) {
            self.stats.session_deferred.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush_sessions(&mut self) -> bool {
        let sink = &self.sink;
        flush_in_order(&mut self.session_backlog, |o| sink.try_send(o))
    }

    /// Handles up to [`INBOUND_BUDGET`] consumed records.
    fn take_inbound(&mut self) -> usize {
        let mut n = 0;
        while n < INBOUND_BUDGET && self.deferred_total < DEFERRED_HIGH {
            let Ok(rec) = self.inbound.try_recv() else {
                break;
            };
            n += 1;
            self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
            self.inbound_frame(&rec.payload);
        }
        n
    }

    /// Validates one record in place and hands what it carries to the owning shard.
    fn inbound_frame(&mut self, payload: &[u8]) {
        // decode_counted counts a bad frame and logs its first occurrence.
        let Ok(frame) = decode_counted(&self.frames, payload) else {
            return;
        };
        let shards = self.replies.len();
        match frame {
            ArchivedBusFrame::Deliver(d) => {
                let recipient = d.recipient.as_slice().to_vec();
                let owner = owner_of(&recipient, shards);
                // A sender edge's direct copy ([`CoreRequest::Forward`]) has no origin, and the
                // previous message's id where the sender is.
                let direct = d.origin.is_empty();
                let id = d.id.to_native();
                if iris_bus::hops::id_region(id) != self.own_region_index {
                    self.cross_region.record_id(id);
                }
                // A direct copy's sender field: the previous id (8 bytes), then the sender.
                let sender = d.sender.as_slice();
                let (prev, sender) = match (direct, sender.split_first_chunk::<8>()) {
                    (true, Some((id, name))) => (u64::from_be_bytes(*id), name),
                    (true, None) => (0, &[][..]),
                    (false, _) => (0, sender),
                };
                self.reply(
                    owner,
                    CoreReply::Deliver {
                        recipient,
                        id: d.id.to_native(),
                        sender: sender.to_vec(),
                        payload: d.payload.as_slice().to_vec(),
                        direct,
                        prev,
                        kind: d.kind,
                    },
                );
            }
            ArchivedBusFrame::DrainChunk(c) if c.node.to_native() == self.node => {
                let Some(shard) = self.named_shard(c.shard.to_native()) else {
                    return;
                };
                let msgs = c
                    .messages
                    .iter()
                    .map(|m| DrainedMsg {
                        id: m.id.to_native(),
                        sender: m.sender.as_slice().to_vec(),
                        payload: m.payload.as_slice().to_vec(),
                        kind: m.kind,
                    })
                    .collect();
                self.reply(
                    shard,
                    CoreReply::Drain {
                        conn: c.conn.to_native(),
                        user: c.user.as_slice().to_vec(),
                        msgs,
                        more: c.more,
                        // Cluster edges keep no clean marks, the only use of this flag.
                        complete: true,
                    },
                );
            }
            ArchivedBusFrame::Confirmed(c)
                if c.to.node.to_native() == self.node && c.to.run.to_native() == self.run =>
            {
                let Some(shard) = self.named_shard(c.to.shard.to_native()) else {
                    return;
                };
                let outcome = if c.duplicate {
                    Confirmed::Duplicate
                } else {
                    Confirmed::Stored
                };
                self.reply(
                    shard,
                    CoreReply::Confirms {
                        conn: c.to.conn.to_native(),
                        confirms: vec![Confirm {
                            client: c.to.client.to_native(),
                            id: c.id.to_native(),
                            outcome,
                        }],
                    },
                );
            }
            ArchivedBusFrame::PrekeyBundle(b) if b.node.to_native() == self.node => {
                let Some(shard) = self.named_shard(b.shard.to_native()) else {
                    return;
                };
                self.reply(
                    shard,
                    CoreReply::Prekeys {
                        conn: b.conn.to_native(),
                        user: b.user.as_slice().to_vec(),
                        bundle: b.bundle.as_ref().map(|v| v.as_slice().to_vec()),
                    },
                );
            }
            ArchivedBusFrame::Relay(r) => {
                let recipient = r.recipient.as_slice().to_vec();
                let owner = owner_of(&recipient, shards);
                self.reply(
                    owner,
                    CoreReply::Relay {
                        recipient,
                        frame: r.frame.as_slice().to_vec(),
                    },
                );
            }
            ArchivedBusFrame::Presence(p) if p.node.to_native() != self.node => {
                let user = p.user.as_slice().to_vec();
                let owner = owner_of(&user, shards);
                self.reply(
                    owner,
                    CoreReply::Presence {
                        user,
                        node: p.node.to_native(),
                        online: p.online,
                        unix_ms: p.unix_ms.to_native(),
                    },
                );
            }
            ArchivedBusFrame::EdgeReset(r) if r.node.to_native() == self.node => {
                // This node's own announcement, back from the presence topic: the session store
                // learns the run, so session fields of earlier runs are ignored (an earlier
                // run's reset read late changes nothing).
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                let run = r.unix_ms.to_native();
                if run == self.run {
                    self.session(SessionOp::Announce {
                        node: self.node.to_string(),
                        region: self.region.clone(),
                        run,
                    });
                }
            }
            ArchivedBusFrame::EdgeReset(r) => {
                let node = r.node.to_native();
                let unix_ms = r.unix_ms.to_native();
                debug!(node, "edge reset announced");
                for s in 0..shards {
                    self.reply(s, CoreReply::EdgeReset { node, unix_ms });
                }
            }
            other => {
                // Our own presence and reset, another node's chunks, core-bound frames.
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(
                    kind = other.kind().name(),
                    "bus frame not for this edge, ignored"
                );
            }
        }
    }

    /// Encodes `frame`; a frame the bus cannot carry is counted, logged and dropped (`None`).
    fn encode_counted(&self, frame: &BusFrame) -> Option<Vec<u8>> {
        match encode(frame) {
            Ok(p) => Some(p),
            Err(e) => {
                self.stats.encode_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, kind = frame.kind().name(), "bus frame not encoded, dropped");
                None
            }
        }
    }

    /// Encodes `frame` for partition 0 of edge `node`'s inbox and queues it for the producer
    /// (a live copy: no ticket, the stored copy is the core's).
    fn produce_inbox(&mut self, node: u32, frame: BusFrame) {
        let Some(payload) = self.encode_counted(&frame) else {
            return;
        };
        let user = frame.key_user();
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        let region = &self.region;
        let topic = Arc::clone(
            self.inboxes
                .entry(node)
                .or_insert_with(|| Arc::from(topics::edge_inbox(region, node).as_str())),
        );
        let out = OutFrame {
            topic,
            partition: 0,
            key: (!user.is_empty()).then(|| user.to_vec()),
            payload,
            ticket: 0,
        };
        self.queue_out(out);
    }

    /// The shard a chunk or bundle names, if this edge has it (else counted as ignored).
    fn named_shard(&self, shard: u32) -> Option<usize> {
        let shard = shard as usize;
        if shard < self.replies.len() {
            Some(shard)
        } else {
            self.stats.ignored.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn reply(&mut self, shard: usize, r: CoreReply) {
        let before = self.deferred[shard].len();
        let tx = &self.replies[shard];
        let newly_full = self.deferred[shard].is_empty();
        if send_in_order(&mut self.deferred[shard], r, |r| to_shard(tx, r)) && newly_full {
            self.stats.replies_deferred.fetch_add(1, Ordering::Relaxed);
        }
        self.bells[shard].ring();
        self.deferred_total += self.deferred[shard].len() - before;
    }

    fn flush_deferred(&mut self) -> bool {
        let mut moved = false;
        for s in 0..self.deferred.len() {
            let before = self.deferred[s].len();
            let tx = &self.replies[s];
            let moved_here = flush_in_order(&mut self.deferred[s], |r| to_shard(tx, r));
            if moved_here {
                self.bells[s].ring();
            }
            moved |= moved_here;
            self.deferred_total -= before - self.deferred[s].len();
        }
        moved
    }
}

/// `inner` wrapped for its home region `home`.
fn route(home: String, inner: Routed) -> BusFrame {
    BusFrame::Route(Route {
        region: home,
        inner,
    })
}

/// The kind of a relayed client frame (0x75 read receipt, 0x72 typing with its on/off byte last).
fn relay_kind(frame: &[u8]) -> RelayKind {
    match frame.first() {
        Some(0x75) => RelayKind::ReadReceipt,
        Some(0x72) if frame.last() == Some(&0) => RelayKind::TypingStop,
        _ => RelayKind::TypingStart,
    }
}

/// Hands a reply to a shard's queue; a shard that is gone (shutdown) drops it.
fn to_shard(tx: &Sender<CoreReply>, r: CoreReply) -> Result<(), CoreReply> {
    match tx.try_send(r) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => Ok(()),
        Err(TrySendError::Full(r)) => Err(r),
    }
}

/// Sends `item` at once when nothing waits before it, else queues it behind the others, so
/// order is kept. True when it had to wait.
fn send_in_order<T>(
    backlog: &mut VecDeque<T>,
    item: T,
    mut try_send: impl FnMut(T) -> Result<(), T>,
) -> bool {
    if backlog.is_empty() {
        match try_send(item) {
            Ok(()) => return false,
            Err(item) => backlog.push_back(item),
        }
    } else {
        backlog.push_back(item);
    }
    true
}

/// Sends what `backlog` holds, in order, until the receiver is full. True if anything went.
fn flush_in_order<T>(
    backlog: &mut VecDeque<T>,
    mut try_send: impl FnMut(T) -> Result<(), T>,
) -> bool {
    let mut moved = false;
    while let Some(item) = backlog.pop_front() {
        match try_send(item) {
            Ok(()) => moved = true,
            Err(item) => {
                backlog.push_front(item);
                break;
            }
        }
    }
    moved
}

/// The shard owning `user`'s presence on an edge of `shards` shards: the one user hash, as
/// `iris_edge::shard::owner_of` computes it.
fn owner_of(user: &[u8], shards: usize) -> usize {
    topics::partition_of(user, shards as u32) as usize
}
