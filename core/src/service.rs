//! The cluster core service: what one `iris-core` process does in a regional cluster.
//!
//! **Static partition ownership.** The region's deliver topic (`topics::deliver(region)`) is
//! split between `members` processes: member `member` owns the partitions `p` with
//! `p % members == member` ([`owned_partitions`]) of the topic's *actual* partition count (read
//! from the broker's metadata after the topics are ensured). A partition is a core shard
//! (`topics::partition_of(user, P)`). The consumer is `assign()`ed those partitions, each from
//! the offset committed in the group `iris-core-{region}` (rdkafka `Offset::Stored`; no
//! committed offset: `auto.offset.reset=earliest`). The group only stores offsets: there is no
//! group membership and no rebalance, because the message store is this process's own fjall
//! database on local disk, and a partition moved to another process would lose what was stored
//! here. A killed core's partitions wait in the broker until that member restarts on its data
//! directory; nothing is lost meanwhile. Failover across processes needs the shared (ScyllaDB)
//! store.
//!
//! Besides its deliver partitions, the consumer is assigned the same-numbered partitions of the
//! region's presence topic (every presence partition when the counts differ), from their end at
//! each start and never committed: they feed the presence cache (below) with the events seen
//! since this process started.
//!
//! For each record (validated with `decode_counted`; a bad frame is counted, its first
//! occurrence logged, and skipped; a frame whose user is empty or too long for the store is
//! counted as `rejected` and skipped):
//!
//! - `Deliver`: stored in the [`MessageStore`] (the record of truth until acked), and routed
//!   (below) to the recipient's edge(s) when its window closes. Offline: it stays stored for
//!   the next login.
//!   A deliver with `confirm` set (a protocol v2 SEND) is first checked against the v2 dedup
//!   records `(sender, client id) -> id` (the window's, then the store's `sent` keyspace): seen
//!   with another id, it is a resend, neither stored nor routed (`resends`); otherwise its record
//!   joins the window. Either way a `Confirmed` (with the first id for a resend) joins the
//!   window's confirms, produced only once the window is fsynced (see below). Records expire
//!   after [`ServiceConfig::dedup_ttl_secs`] (bounded sweep turns, `dedup_expired`).
//! - `Relay` (typing, read receipt; `frame` is the recipient's complete client frame): routed
//!   exactly like a deliver, but never stored; with no target it is dropped (`relays_dropped`).
//! - `Ack`: the message is deleted; an ack inside the same window also cancels the pending
//!   insert and its route.
//! - `DrainRequest`: answered with one `DrainChunk` (messages with `id > after` in id order, at
//!   most `min(limit, MAX_DRAIN_CHUNK)` and at most [`MAX_DRAIN_CHUNK_BYTES`] of payload and
//!   sender, one larger message alone; `more` when more are stored) on the requesting edge's
//!   inbox (`node` of the request). A request with `after == 0` (a login starts) also records a
//!   **login hint** user → (node, now).
//! - `PrekeyPut`: the bundle is stored (replacing the previous one) with the window's batch.
//! - `PrekeyFetch`: answered with a `PrekeyBundle` (`None` when nothing is stored) on the inbox of
//!   the request's `node`, like a drain chunk.
//! - `Presence` (presence topic): the presence cache adds (node, login ms) for an online event
//!   and removes the node for an offline one (unless its login is newer); an event stamped
//!   before its node's last `EdgeReset` is stale and ignored. A user whose last node goes
//!   offline leaves the cache (Redis is asked again). `EdgeReset` (presence topic): the node
//!   leaves every cached user, and the login hints naming it are dropped.
//! - Anything else (presence on the deliver topic, chunks, bundles, routes): counted, ignored.
//!
//! **Routing.** The targets of a deliver or relay are the recipient's nodes in the presence
//! cache when it has an entry (a set: every device of the user), else the nodes of its Redis
//! session ([`online_nodes`](crate::sessions::SessionRecord::online_nodes) in this region; [`SessionReader::get_many`], one
//! pipelined lookup per window for the uncached recipients only; a newly cached user's Redis
//! nodes are merged into its entry at its first lookup, once, so a device that logged in before
//! this process started is not missed), plus its login hint's node
//! (when a hint younger than [`HINT_TTL`] existed when the record was consumed); each distinct
//! node gets the frame once, the consumed record's bytes unchanged. The hint covers the race of
//! a login: a deliver consumed after the login's drain request but before the edge's session
//! write reached Redis (or its presence event reached the core) is neither in the drain's chunk
//! nor routable by session, yet must reach the user live. A stale hint only costs the edge a
//! frame it drops; the message stays stored until acked. Hints older than [`HINT_TTL`] are
//! pruned at most once a second; at most [`MAX_HINTS`] are held.
//!
//! **Redis failures.** A failed lookup holds the routes and relays that needed it (at most
//! [`MAX_RETRY`] / [`MAX_RETRY_BYTES`], oldest dropped and counted: their messages stay stored)
//! and retries the lookup every [`RETRY_EVERY`] on a lookup thread, so a hung Redis never stalls
//! consumption; until one works, windows do not ask Redis (cached recipients are routed at once,
//! uncached ones join the held routes, keeping their order). Then every held route the answer
//! covers is routed, in order; during [`RESYNC_GRACE`] after the outage a route whose recipient
//! has no session yet stays held (an empty, restarted Redis is refilled by the edges' resync).
//!
//! **Edge inbox partition.** Everything the core produces to an edge inbox goes to partition 0:
//! one edge consumes its whole inbox and hands each frame to the shard it names (a chunk or a
//! bundle carries `shard`, a deliver or relay is owned by `partition_of(recipient, shards)`),
//! and one partition keeps the core's frames for that edge in the order the core decided them.
//!
//! **Ordering.** A user's core-bound frames all land on the user's one partition, and the
//! service handles a partition's records one at a time in offset order. So when a drain request
//! or a prekey fetch is handled every earlier record of that user has been applied: the pending
//! window is written to the store (not yet fsynced) before the read.
//!
//! **Pipelined windows: route before the fsync, commit after everything is safe.** Records are
//! applied to an in-memory window; at the end of the commit window (`commit_window`, 2 ms by
//! default, from the window's first record) or after `max_batch` records the window closes: its
//! batch is written (one atomic batch) and the fsync thread is asked to make it durable, and its
//! outputs (routed delivers and relays, drain chunks, prekey bundles) are handed to the producer
//! at once, each with a ticket ([`OutFrame::ticket`]): a live copy does not wait for the fsync;
//! its durability comes from the broker (and the sender edge's outbox). The window's offsets
//! are committed only once its fsync is done and every one of its tickets was reported done
//! ([`ProducerRing::take_done`]), strictly in window order, while the following windows keep
//! being consumed. Its `Confirmed` frames (protocol v2) are produced only once its fsync is
//! done, ticketed in the window: a SEND_ACK means the message is on the core's disk
//! (consumption pauses beyond 1024 windows or
//! 200,000 outputs waiting). So a crash (kill -9) consumes again every record
//! whose routed copy might not have reached the broker and routes it again, without a login:
//! at-least-once (ids make duplicates detectable), nothing lost. A frame the producer can never
//! produce is counted (`outputs_failed`) and does not hold its window. A failed write or fsync
//! stops the service with an error, offsets uncommitted.
//!
//! **Regions (home side).** With more than one region ([`ServiceConfig::global`] set) the
//! service also starts the [`Importer`] (the region's route topic on
//! the global bus into the regional topics) and a producer on the global brokers, whose reports
//! feed the same tickets as the regional producer's. Home-aware rules:
//!
//! - `Deliver` for a user homed here: as above, unless its `(recipient, id)` is in the acked-ids
//!   memory (the last [`ACKED_MEMORY`] acks, [`ACKED_TTL`]): then counted as `duplicates` and
//!   dropped. If the user roams in another region, also `Route{region, Deliver}` on the global
//!   bus, its `origin` prefixed with [`VISITOR_MARK`] (a *visitor copy*; likewise for relays).
//! - `Deliver` for a user homed elsewhere carrying the mark (a visitor's live copy, sent by its
//!   home): routed to its sessions here, never stored; with none, dropped (`visitor_dropped`).
//! - `Deliver` for a user homed elsewhere *without* the mark: the user's home moved (the home
//!   table changed) and an edge or importer with the old table sent it here. Nobody stores it
//!   yet, so it is forwarded as `Route{home, Deliver}` on the global bus (`forwarded_home`),
//!   ticketed in its window like every output.
//! - `DrainRequest` / `PrekeyFetch` whose `region` names another region: the user is recorded as
//!   a roamer there (in memory, [`ROAMER_TTL`], ended by a local login's drain request; lost at
//!   a restart until the user's next login) and the answer goes as `Route{region, ..}` on the
//!   global bus.
//!
//! **Lost topics.** A [`TopicKeeper`] re-creates the deliver and presence topics when the
//! broker lost them (every 2 s, and at once after a consume error); the service then stops
//! with [`CoreError::TopicsLost`] for a restart, which reads the new logs from their beginning.
//! The same when the importer stopped because the global broker lost the route topic
//! ([`crate::import`], "Lost topics").
//!
//! **Admin endpoint.** With [`ServiceConfig::admin`] set, a plain std thread serves
//! `GET /metrics` (Prometheus text: every [`ServiceStats`] counter as
//! `iris_core_<name>_total`, `iris_core_bus_frames_total{outcome=...}`, the producer's
//! counters, gauges) and `GET /health` (`200 ok`, `503 stopping` once shutdown began).
//!
//! **Rehome.** `POST /rehome?user=U` on the admin endpoint moves U's stored messages (and
//! prekeys) to U's new home after the home table changed (docs/REGIONS.md, "Changing a user's
//! home"). The admin thread hands the request to the consume loop, which answers `409` while
//! its own table still homes U here, `421` naming the right member when U's partition is not
//! its own, else moves: in steps of [`REHOME_STEP`] stored messages, in id order, each sent as
//! `Route{home, Deliver{original id, .., origin: own}}` on the global producer (ticketed) and
//! deleted from the store only after the global broker acknowledged it; the next step starts
//! when the previous one is all reported, so the loop never waits on a move. A crash midway
//! leaves the rest stored: asking again finishes it (the new home stores by (recipient, id)).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iris_bus::home::Homes;
use iris_bus::hops::HopHistogram;
use iris_bus::kafka::{
    ensure_topics, start_offsets, Done, KafkaConfig, KafkaProducer, OffsetGuard, OutFrame,
    ProducerRing, ReadMarks, RecreationCursor, TopicKeeper, MARKS_EVERY,
};
use iris_bus::{
    decode_counted, encode, to_owned, ArchivedBusFrame, BusFrame, ConfirmTo, Confirmed, Deliver,
    DrainChunk, DrainRequest, Drained, FrameCounts, FrameStats, PrekeyBundle, PrekeyFetch,
    PrekeyPut, Route, Routed,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, info, trace, warn};

use crate::api::StoredMsg;
use crate::error::CoreError;
use crate::import::{ImportConfig, ImportStats, Importer};
use crate::sessions::{SessionConfig, SessionReader, SessionRecord};
use crate::store::{
    Batch, MessageStore, SentRecord, SweepSchedule, MAX_SENDER_LEN, MAX_USER_LEN, SWEEP_BUDGET,
};

/// The most messages one `DrainChunk` carries, whatever the request's `limit`.
pub const MAX_DRAIN_CHUNK: usize = 1000;

/// The most payload and sender bytes one `DrainChunk` carries (a single larger message still
/// goes alone): keeps a chunk well under the broker's default 1 MB record limit.
pub const MAX_DRAIN_CHUNK_BYTES: usize = 512 * 1024;

/// Messages read from the store at a time while a drain chunk is filled.
const DRAIN_PAGE: usize = 64;

/// The most routes and relays held for a session lookup retry while Redis fails (the oldest
/// are dropped beyond it, counted as `retry_dropped`; their messages stay stored).
pub const MAX_RETRY: usize = 100_000;

/// The same bound in bytes (records and recipients held).
pub const MAX_RETRY_BYTES: usize = 64 << 20;

/// How often the held routes' session lookup is retried while Redis fails.
pub const RETRY_EVERY: Duration = Duration::from_millis(200);

/// After a Redis outage, how long a held route whose recipient has no session (and no cache
/// entry or hint) stays held, re-looked up, before it counts as offline: a Redis that restarted
/// empty is refilled by the edges' session resync.
pub const RESYNC_GRACE: Duration = Duration::from_secs(5);

/// The most users the presence cache holds (further logins are looked up in Redis).
pub const MAX_CACHED_USERS: usize = 1_000_000;

/// Closed windows waiting for their acks beyond which consumption pauses.
const MAX_INFLIGHT_WINDOWS: usize = 1024;

/// Ticketed outputs waiting for their acks beyond which consumption pauses.
const MAX_INFLIGHT_OUTPUTS: usize = 200_000;

/// How often the producer's reports are looked at while closed windows wait for them.
const ACK_POLL: Duration = Duration::from_millis(1);

/// How long a stopping service waits for its closed windows' acks.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How often the topic keeper checks that the region's topics exist.
const KEEPER_EVERY: Duration = Duration::from_secs(2);

/// How long a login hint (user → node of its latest `DrainRequest` with `after == 0`) routes
/// the user's delivers and relays to that node besides its Redis session.
pub const HINT_TTL: Duration = Duration::from_secs(60);

/// The most login hints held at once (about 60 bytes plus the user id each); hints of logins
/// beyond it are not recorded (`hints_dropped`) until the next prune frees room.
pub const MAX_HINTS: usize = 1_000_000;

/// Hints are pruned at most this often (on a flush).
const HINT_PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How many acked `(recipient, id)` keys the core remembers to drop a late duplicate deliver
/// (a copy imported again after a crash, a retried produce) instead of storing it again.
pub const ACKED_MEMORY: usize = 1_000_000;

/// How long an acked key is remembered (at most [`ACKED_MEMORY`] of them).
pub const ACKED_TTL: Duration = Duration::from_secs(600);

/// How long a roamer entry (a user homed here whose latest drain request came from another
/// region) copies the user's delivers to that region.
pub const ROAMER_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long [`CoreService::start`] waits for the deliver topic's partitions to show in the
/// broker's metadata.
const METADATA_WAIT: Duration = Duration::from_secs(30);

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
    /// Partitions of the deliver and presence topics when this process creates them (an
    /// existing topic keeps its count, which is the one used).
    pub partitions: u32,
    /// Consumer group id (`iris-core-{region}` by default): only stores the committed offsets.
    pub group: String,
    /// Group commit window: records are made durable at most this long after the first one.
    pub commit_window: Duration,
    /// A window is committed early once it holds this many records.
    pub max_batch: usize,
    /// This process's index among the `members`: it owns the deliver partitions `p` with
    /// `p % members == member`.
    pub member: u32,
    /// How many `iris-core` processes share the region's deliver partitions (at least 1).
    pub members: u32,
    /// Address of the admin endpoint (`/metrics`, `/health`); `None`: no endpoint. Port 0
    /// binds a free port ([`CoreService::admin_addr`] tells which).
    pub admin: Option<SocketAddr>,
    /// Consumer `fetch.wait.max.ms`: the longest a fetch waits at the broker (tansu answers
    /// only at this deadline, so it bounds the consume hop there; 500 suits a real Kafka).
    pub fetch_wait_max_ms: u32,
    /// The region list, this region's place in it and the home table: which users are homed
    /// here. Single-region (everyone homed here) by default.
    pub homes: Arc<Homes>,
    /// The global bus (cross-region route topics); `Some` exactly when `homes` lists more than
    /// one region. `None` by default.
    pub global: Option<KafkaConfig>,
    /// How long a v2 sender's `(sender, client message id) -> id` record is kept (a resend
    /// within this time is confirmed with the first id and neither stored nor routed again);
    /// 0 never expires them. 24 h by default, like the embedded store's `dedup_ttl_secs`.
    pub dedup_ttl_secs: u64,
    /// A stored message older than this (its id carries its accept time) is never drained
    /// and is deleted by a bounded background sweep; 0 keeps messages until acked. 30 days by
    /// default, like the embedded store's `message_ttl_secs`.
    pub message_ttl_secs: u64,
}

impl ServiceConfig {
    /// A configuration with the defaults: 16 partitions, group `iris-core-{region}`, a 2 ms
    /// commit window, 4096 records per window at most, member 0 of 1 (every partition), no
    /// admin endpoint, a 5 ms fetch wait, a single region (everyone homed here, no global bus).
    pub fn new(
        brokers: impl Into<String>,
        redis_url: impl Into<String>,
        region: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        let region = region.into();
        let homes = Arc::new(Homes::single(&region));
        ServiceConfig {
            brokers: brokers.into(),
            redis_url: redis_url.into(),
            group: format!("iris-core-{region}"),
            region,
            data_dir: data_dir.into(),
            partitions: 16,
            commit_window: Duration::from_millis(2),
            max_batch: 4096,
            member: 0,
            members: 1,
            admin: None,
            fetch_wait_max_ms: 5,
            homes,
            global: None,
            dedup_ttl_secs: 24 * 3600,
            message_ttl_secs: 30 * 24 * 3600,
        }
    }

    /// Checks the region name, `members >= 1`, `member < members`, `partitions >= 1`,
    /// `max_batch >= 1`, that `homes` is built for this region and that a global bus is given
    /// exactly when more than one region is listed.
    pub fn validate(&self) -> Result<(), CoreError> {
        if !iris_bus::topics::is_valid_region(&self.region) {
            return Err(CoreError::InvalidInput(format!(
                "invalid region name {:?}: 1-64 bytes of [a-z0-9-], not \"global\"",
                self.region
            )));
        }
        if self.members == 0 {
            return Err(CoreError::InvalidInput(
                "members must be at least 1".to_owned(),
            ));
        }
        if self.member >= self.members {
            return Err(CoreError::InvalidInput(format!(
                "member {} out of range: members {} (member must be below members)",
                self.member, self.members
            )));
        }
        if self.partitions == 0 {
            return Err(CoreError::InvalidInput(
                "partitions must be at least 1".to_owned(),
            ));
        }
        if self.max_batch == 0 {
            return Err(CoreError::InvalidInput(
                "max_batch must be at least 1".to_owned(),
            ));
        }
        if self.homes.own() != self.region {
            return Err(CoreError::InvalidInput(format!(
                "homes are built for region {:?}, not {:?}",
                self.homes.own(),
                self.region
            )));
        }
        match (&self.global, self.homes.is_multi()) {
            (None, true) => {
                return Err(CoreError::InvalidInput(format!(
                    "global brokers are required with more than one region ({:?})",
                    self.homes.regions()
                )))
            }
            (Some(_), false) => {
                return Err(CoreError::InvalidInput(
                    "global brokers are given but only one region is listed".to_owned(),
                ))
            }
            (Some(g), true) if g.brokers.trim().is_empty() => {
                return Err(CoreError::InvalidInput(
                    "global brokers must name at least one broker".to_owned(),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// The deliver partitions member `member` of `members` owns in a topic of `partitions`
/// partitions: every `p` with `p % members == member`, ascending.
pub fn owned_partitions(partitions: u32, member: u32, members: u32) -> Vec<i32> {
    let members = members.max(1);
    (0..partitions)
        .filter(|p| p % members == member)
        .map(|p| p as i32)
        .collect()
}

/// One counter of [`ServiceStats::counters`]: its name (the metric is `iris_core_{name}_total`),
/// its description and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The field name.
    pub name: &'static str,
    /// The field's doc comment.
    pub help: &'static str,
    /// The value at the snapshot.
    pub value: u64,
}

/// Declares [`ServiceStats`] with its monotonic counters and lists them all in
/// [`ServiceStats::counters`], so `/metrics` cannot miss one.
macro_rules! service_stats {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Counters of the service (monotonic, except the gauges `hints_held`, `cached_users`,
        /// `retry_held`, `windows_waiting`, `outputs_waiting`).
        #[derive(Debug, Default)]
        pub struct ServiceStats {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
            /// Login hints held now (a gauge).
            pub hints_held: AtomicU64,
            /// Users in the presence cache now (a gauge).
            pub cached_users: AtomicU64,
            /// Routes and relays held for a lookup retry now (a gauge).
            pub retry_held: AtomicU64,
            /// Closed windows waiting for their fsync or acks before their offsets are
            /// committed (a gauge).
            pub windows_waiting: AtomicU64,
            /// Ticketed outputs not yet reported by the producer (a gauge).
            pub outputs_waiting: AtomicU64,
            /// Roamer entries held now (a gauge).
            pub roamers: AtomicU64,
        }

        impl ServiceStats {
            /// A snapshot of every monotonic counter, in declaration order.
            pub fn counters(&self) -> Vec<Counter> {
                vec![$(Counter {
                    name: stringify!($name),
                    help: concat!($($doc),+),
                    value: self.$name.load(Ordering::Relaxed),
                },)+]
            }
        }
    };
}

service_stats! {
    /// Records consumed (good or bad).
    records,
    /// Deliver frames handled.
    delivers,
    /// Ack frames handled.
    acks,
    /// Acks that cancelled an insert of the same window.
    cancelled,
    /// Acks of messages neither stored nor in the window: answered by a lookup, no tombstone.
    acks_not_stored,
    /// Drain requests answered.
    drains,
    /// Relay frames handled.
    relays,
    /// Prekey bundles stored (PrekeyPut frames).
    prekey_puts,
    /// Prekey fetches answered.
    prekey_fetches,
    /// Deliver partitions sought back to an earlier batch at start, because the broker answered
    /// from past the committed offset (tansu: a fetch from inside a record batch).
    batch_seeks,
    /// Records of the deliver and presence topics the broker sent again in one pass, dropped.
    broker_repeats,
    /// Presence frames seen (ignored).
    presence,
    /// Other frames seen on the deliver topic (ignored).
    ignored,
    /// Frames skipped because their user is empty or too long for the store.
    rejected,
    /// Deliver frames produced to an edge inbox (one per target node).
    routed,
    /// Delivers with no target node, kept for the next login.
    offline,
    /// Confirmed frames sent to v2 senders' edges (after their window's fsync).
    confirms,
    /// v2 resends: delivers whose `(sender, client id)` was seen before, confirmed with the
    /// first message's id and neither stored nor routed.
    resends,
    /// Expired v2 dedup records deleted.
    dedup_expired,
    /// Stored messages older than `message_ttl_secs` deleted (never drained).
    expired_deleted,
    /// Relay frames produced to an edge inbox (one per target node).
    relays_routed,
    /// Relays with no target node, dropped.
    relays_dropped,
    /// Delivers and relays produced to a login hint's node that the session did not name.
    hinted_routes,
    /// Login hints not recorded because MAX_HINTS were held.
    hints_dropped,
    /// Durable store commits.
    commits,
    /// Session lookups that failed (their routes wait for a retry).
    session_errors,
    /// Pipelined Redis session lookups made (one per window with uncached recipients, one per
    /// retry).
    session_lookups,
    /// Routes and relays whose targets came from the presence cache.
    cache_hits,
    /// Online presence events not cached because MAX_CACHED_USERS were held.
    cache_full,
    /// Edge resets seen on the presence topic.
    edge_resets,
    /// Times a route or relay was held for a session lookup retry.
    retry_queued,
    /// Held routes and relays routed after a lookup retry worked.
    retry_routed,
    /// Held routes and relays dropped beyond MAX_RETRY or MAX_RETRY_BYTES (messages stay stored).
    retry_dropped,
    /// Outputs the producer reported as never producible (their window still commits).
    outputs_failed,
    /// Delivers of a message acked recently (the acked-ids memory): not stored again.
    duplicates,
    /// Delivers for a user homed elsewhere (a visitor's live copy sent by its home) handled.
    visitors,
    /// Visitor copies produced to an edge inbox (one per target node).
    visitors_routed,
    /// Visitor copies with no session in this region, dropped (the home keeps them stored).
    visitor_dropped,
    /// Delivers and relays copied to a roaming recipient's region (global bus).
    roamed,
    /// Drain requests and prekey fetches from another region, answered across the global bus.
    foreign_answers,
    /// Delivers for a user homed elsewhere that are not a visitor copy (sent by an edge or an
    /// importer that still had the old home table), forwarded to the home over the global bus.
    forwarded_home,
    /// Stored messages moved to a user's new home by `POST /rehome` (deleted here once the
    /// global broker acknowledged them).
    rehomed,
    /// Prekey bundles moved to a user's new home by `POST /rehome`.
    rehomed_prekeys,
    /// Rehome copies the global producer reported as never producible (left stored here).
    rehome_failed,
}

/// One output decided inside a window, handed to the producer when the window closes.
enum Output {
    /// A stored message (the consumed record, unchanged) to route to the recipient's edge(s).
    Route {
        recipient: Vec<u8>,
        id: u64,
        record: Vec<u8>,
        hint: Option<u32>,
    },
    /// A relay (the consumed record, unchanged) to route like a deliver; never stored.
    Relay {
        recipient: Vec<u8>,
        record: Vec<u8>,
        hint: Option<u32>,
    },
    /// An encoded answer (drain chunk, prekey bundle) for the inbox of edge `node`.
    Frame {
        node: u32,
        key: Vec<u8>,
        payload: Vec<u8>,
    },
    /// A live copy of a deliver for a user homed elsewhere (the consumed record, unchanged):
    /// routed like a deliver, never stored; dropped when the user has no session here.
    Visitor {
        recipient: Vec<u8>,
        id: u64,
        record: Vec<u8>,
        hint: Option<u32>,
    },
    /// An encoded `Route` frame for region `region`'s route topic on the global bus (message
    /// `id`, 0 for none), keyed by `key`.
    Global {
        region: String,
        key: Vec<u8>,
        payload: Vec<u8>,
        id: u64,
    },
}

impl Output {
    /// The login hint's node of a route or relay.
    fn hint(&self) -> Option<u32> {
        match self {
            Output::Route { hint, .. }
            | Output::Relay { hint, .. }
            | Output::Visitor { hint, .. } => *hint,
            Output::Frame { .. } | Output::Global { .. } => None,
        }
    }

    /// The recipient of a route or relay.
    fn recipient(&self) -> Option<&[u8]> {
        match self {
            Output::Route { recipient, .. }
            | Output::Relay { recipient, .. }
            | Output::Visitor { recipient, .. } => Some(recipient),
            Output::Frame { .. } | Output::Global { .. } => None,
        }
    }

    /// Bytes held by a route or relay kept for a retry (about).
    fn held_bytes(&self) -> usize {
        match self {
            Output::Route {
                recipient, record, ..
            }
            | Output::Relay {
                recipient, record, ..
            }
            | Output::Visitor {
                recipient, record, ..
            } => recipient.len() + record.len() + 64,
            Output::Frame { key, payload, .. } | Output::Global { key, payload, .. } => {
                key.len() + payload.len() + 64
            }
        }
    }
}

/// The records applied since the last window closed.
#[derive(Default)]
struct Window {
    started: Option<Instant>,
    records: usize,
    /// Inserts not yet written, by `(recipient, id)`.
    inserts: BTreeMap<(Vec<u8>, u64), StoredMsg>,
    /// Deletes not yet written.
    deletes: Vec<(Vec<u8>, u64)>,
    /// Prekey bundles not yet written, by user (the latest wins).
    prekeys: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Messages acked in this window (not routed even if delivered in it).
    acked: HashSet<(Vec<u8>, u64)>,
    outputs: Vec<Output>,
    /// v2 dedup records not yet written, `(sender, client id) -> id`.
    sent: HashMap<(Vec<u8>, u64), u64>,
    /// Expired dedup records to delete with the next write.
    sent_expired: Vec<SentRecord>,
    /// Confirmed frames of this window: produced only once its fsync is done.
    confirms: Vec<Output>,
    /// Next offset to commit per partition.
    offsets: HashMap<i32, i64>,
}

/// A closed window whose offsets wait for its fsync and for every one of its ticketed outputs.
struct Inflight {
    seq: u64,
    offsets: HashMap<i32, i64>,
    /// Ticketed outputs not yet reported done by the producer.
    waiting: usize,
    /// Confirmed frames waiting for this window's fsync (then produced, ticketed).
    confirms: Vec<Output>,
}

/// Window sequence number of the outputs that belong to no window (retried routes).
const NO_WINDOW: u64 = 0;

/// Stored messages a rehome sends per step: the next step starts when the global broker
/// acknowledged them all, so the consume loop never waits on a move.
pub const REHOME_STEP: usize = 512;

/// How long the admin endpoint waits for a rehome's answer before answering `504` (the move
/// goes on; asking again reports the rest).
const REHOME_ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Admin requests answered on threads of their own at once; more are answered inline.
const ADMIN_THREADS: u64 = 8;

/// Prefix of the `origin` of a visitor copy (a home's live copy of a message for a user roaming
/// in another region, [`Deliver::origin`](iris_bus::Deliver) = this mark + the original
/// origin). Region names never contain it. The roaming region's core routes such a copy live
/// only; a `Deliver` for a user homed elsewhere *without* the mark was sent by an edge or an
/// importer with an older home table (the user's home changed) and is forwarded to the home.
pub const VISITOR_MARK: char = '~';

/// An answer of the admin endpoint: status line and plain-text body.
type AdminAnswer = (&'static str, String);

/// A `POST /rehome?user=U` handed from the admin thread to the consume loop.
struct RehomeAsk {
    user: Vec<u8>,
    reply: SyncSender<AdminAnswer>,
}

/// A running rehome: moves `user`'s stored messages (then its prekeys) to `home`, in steps of
/// [`REHOME_STEP`] messages inside the consume loop.
struct RehomeJob {
    user: Vec<u8>,
    home: String,
    reply: SyncSender<AdminAnswer>,
    /// The highest id sent so far (the next step scans after it).
    after: u64,
    /// Copies on the global producer not yet reported: ticket → message id (0: the prekeys).
    in_flight: HashMap<u64, u64>,
    /// Ids the global broker acknowledged, to delete at the next step (0: the prekeys).
    acked: Vec<u64>,
    /// Every stored message was sent (the last scan came back short).
    scanned: bool,
    prekeys_sent: bool,
    moved: u64,
    prekeys_moved: bool,
    failed: u64,
    started: Instant,
}

/// The fsync thread: the consume thread writes a window (not synced), asks for its fsync with
/// the window's sequence number and goes on; the thread fsyncs (one fsync covers every window
/// asked for meanwhile) and answers the highest sequence number made durable.
struct Syncer {
    ask: Option<crossbeam::channel::Sender<u64>>,
    done: crossbeam::channel::Receiver<Result<u64, CoreError>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(store: Arc<MessageStore>) -> Result<Syncer, CoreError> {
        let (ask, asked) = crossbeam::channel::unbounded::<u64>();
        let (answer, done) = crossbeam::channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("iris-core-fsync".to_owned())
            .spawn(move || {
                while let Ok(mut seq) = asked.recv() {
                    while let Ok(s) = asked.try_recv() {
                        seq = seq.max(s);
                    }
                    let r = store.write(&Batch::default(), true).map(|()| seq);
                    let failed = r.is_err();
                    if answer.send(r).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Syncer {
            ask: Some(ask),
            done,
            thread: Some(thread),
        })
    }

    /// Asks for the fsync of everything written so far, as window `seq`.
    fn ask(&self, seq: u64) -> Result<(), CoreError> {
        match &self.ask {
            Some(a) if a.send(seq).is_ok() => Ok(()),
            _ => Err(CoreError::ThreadPanicked),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the retry lookup thread answers: the users asked and their sessions.
type LookupAnswer = (Vec<Vec<u8>>, Result<Vec<Option<SessionRecord>>, CoreError>);

/// The thread that retries session lookups while Redis fails, so a hung Redis (not answering
/// until its timeout) never stalls the consume loop: the loop asks for the held routes'
/// users, goes on, and routes them when the answer comes.
struct Lookups {
    ask: Option<crossbeam::channel::Sender<Vec<Vec<u8>>>>,
    answers: crossbeam::channel::Receiver<LookupAnswer>,
    thread: Option<JoinHandle<()>>,
    /// A lookup was asked and not answered yet.
    asked: bool,
}

impl Lookups {
    fn start(cfg: &SessionConfig) -> Result<Lookups, CoreError> {
        let reader = SessionReader::new(cfg)?;
        let (ask, asked) = crossbeam::channel::unbounded::<Vec<Vec<u8>>>();
        let (answer, answers) = crossbeam::channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("iris-core-lookup".to_owned())
            .spawn(move || {
                while let Ok(users) = asked.recv() {
                    let r = reader.get_many(&users);
                    if answer.send((users, r)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Lookups {
            ask: Some(ask),
            answers,
            thread: Some(thread),
            asked: false,
        })
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One user of the presence cache.
struct CacheEntry {
    /// Nodes where the user is online, with the login's unix ms (0: known from Redis).
    nodes: Vec<(u32, u64)>,
    /// Whether its Redis session was merged in (sessions older than this process).
    merged: bool,
}

/// The acked-ids memory: the last [`ACKED_MEMORY`] acked `(recipient, id)` keys, each for at
/// most [`ACKED_TTL`]. A key is held as `(id, FNV-1a hash of the recipient)` (16 bytes): ids are
/// unique across the deployment, the hash only guards against a foreign id reused for another
/// recipient.
#[derive(Default)]
struct AckedMemory {
    keys: HashSet<(u64, u64)>,
    order: VecDeque<((u64, u64), Instant)>,
}

impl AckedMemory {
    fn key(recipient: &[u8], id: u64) -> (u64, u64) {
        (id, iris_bus::topics::user_hash(recipient))
    }

    fn insert(&mut self, recipient: &[u8], id: u64) {
        let now = Instant::now();
        let key = Self::key(recipient, id);
        if self.keys.insert(key) {
            self.order.push_back((key, now));
        }
        while let Some((k, at)) = self.order.front() {
            if self.order.len() <= ACKED_MEMORY && now.duration_since(*at) < ACKED_TTL {
                break;
            }
            self.keys.remove(k);
            self.order.pop_front();
        }
    }

    fn contains(&self, recipient: &[u8], id: u64) -> bool {
        self.keys.contains(&Self::key(recipient, id))
    }
}

/// Where a user homed here is logged in in another region: its latest foreign drain request.
struct Roamer {
    region: String,
    node: u32,
    since: Instant,
}

/// Frames sent to the global bus per target region (`iris_core_routed_out_total{region=..}`).
#[derive(Debug, Default)]
pub struct RegionStats {
    routed_out: Mutex<BTreeMap<String, u64>>,
}

impl RegionStats {
    fn count(&self, region: &str) {
        let mut m = self.routed_out.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(region.to_owned()).or_insert(0) += 1;
    }

    /// Frames sent to the global bus, per target region.
    pub fn routed_out(&self) -> BTreeMap<String, u64> {
        self.routed_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Per-hop latency histograms of the core (`iris_core_hop_seconds{hop=...}`).
#[derive(Debug, Default)]
pub struct CoreHops {
    /// Accepted by the edge → consumed by the core (delivers).
    pub consumed: HopHistogram,
    /// Accepted by the edge → routed copy acknowledged by the broker (per copy).
    pub routed: HopHistogram,
}

/// The running core service: consumer, producer, store, session reader and admin endpoint.
pub struct CoreService {
    cfg: ServiceConfig,
    deliver_topic: String,
    presence_topic: String,
    /// Partitions of the deliver topic (from the broker's metadata).
    partitions: u32,
    /// The deliver partitions this member owns.
    assigned: Vec<i32>,
    consumer: BaseConsumer,
    /// Holds the deliver partitions to their committed offsets at start.
    offset_guard: OffsetGuard,
    /// Shared with the admin endpoint (producer counters); taken at shutdown.
    producer: Arc<Mutex<Option<KafkaProducer>>>,
    ring: ProducerRing,
    store: Arc<MessageStore>,
    sessions: SessionReader,
    frames: Arc<FrameStats>,
    stats: Arc<ServiceStats>,
    hops: Arc<CoreHops>,
    window: Window,
    /// Closed windows, oldest first, waiting to have their offsets committed.
    inflight: VecDeque<Inflight>,
    next_seq: u64,
    /// The highest window sequence number made durable by the fsync thread.
    synced: u64,
    /// The dedup records' expiry sweep.
    sent_expiry: SweepSchedule,
    /// The messages' expiry sweep.
    expiry: SweepSchedule,
    syncer: Syncer,
    /// Ticketed outputs not yet reported: ticket → (window seq or [`NO_WINDOW`], message id or
    /// 0).
    tickets: HashMap<u64, (u64, u64)>,
    next_ticket: u64,
    done: Vec<Done>,
    /// Login hints: user → (node, when its `after == 0` drain request was handled, the same
    /// in unix ms).
    hints: HashMap<Vec<u8>, (u32, Instant, u64)>,
    hints_pruned: Instant,
    /// Presence cache: user → nodes where it is online (node, login unix ms), from the
    /// presence events seen since this process started.
    online: HashMap<Vec<u8>, CacheEntry>,
    /// Latest `EdgeReset` per node (unix ms): older events of that node are stale.
    resets: HashMap<u32, u64>,
    /// Routes and relays whose session lookup failed, oldest first, retried every
    /// [`RETRY_EVERY`].
    retry: VecDeque<Output>,
    retry_bytes: usize,
    /// When the last lookup failed (`None`: Redis answers); while set, windows do not ask Redis
    /// and their uncached routes wait in `retry`.
    redis_down_since: Option<Instant>,
    retried: Instant,
    /// When the first lookup after an outage worked (`None`: no outage being recovered).
    outage_ended: Option<Instant>,
    lookups: Lookups,
    /// Edge inbox topic names, built once per node.
    inboxes: HashMap<u32, Arc<str>>,
    admin: Option<Admin>,
    keeper: Option<TopicKeeper>,
    /// Which of the deliver and presence topics the keeper re-created (or found replaced)
    /// since last looked.
    recreations: Option<RecreationCursor>,
    /// What was read last from each deliver partition, for the keeper's check.
    read_marks: Arc<ReadMarks>,
    logged_consume_error: bool,
    logged_session_error: bool,
    /// The global bus producer (multi-region): routes to other regions (roamers' copies,
    /// answers to foreign drain requests and prekey fetches). Its reports feed `tickets` like
    /// the regional ring's.
    global: Option<(KafkaProducer, ProducerRing)>,
    /// Route topic names, built once per region.
    routes: HashMap<String, Arc<str>>,
    region_stats: Arc<RegionStats>,
    /// The importer thread (multi-region).
    importer: Option<Importer>,
    /// Users homed here logged in in another region (in memory: lost at a restart).
    roamers: HashMap<Vec<u8>, Roamer>,
    acked: AckedMemory,
    /// Rehome requests from the admin endpoint (`None` once stopping).
    rehome_asks: Option<Receiver<RehomeAsk>>,
    /// The rehome being done, at most one at a time.
    rehome: Option<RehomeJob>,
}

impl std::fmt::Debug for CoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreService")
            .field("region", &self.cfg.region)
            .field("member", &self.cfg.member)
            .field("members", &self.cfg.members)
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

impl CoreService {
    /// Validates `cfg`, creates the missing topics (deliver and presence, `partitions` each),
    /// opens the store, starts the producer, the fsync thread and the topic keeper, reads the
    /// topics' partition counts and assigns this member's deliver partitions (from the group's
    /// committed offsets) and presence partitions (from their end), then starts the admin
    /// endpoint if configured. Consumption starts with [`Self::run`].
    pub fn start(cfg: ServiceConfig) -> Result<Self, CoreError> {
        let sent_expiry = SweepSchedule::new(cfg.dedup_ttl_secs, Instant::now());
        let expiry = SweepSchedule::new(cfg.message_ttl_secs, Instant::now());
        cfg.validate()?;
        let kafka = KafkaConfig {
            brokers: cfg.brokers.clone(),
            client_id: format!("iris-core-{}-{}", cfg.region, cfg.member),
            linger_ms: 1,
            fetch_wait_max_ms: cfg.fetch_wait_max_ms,
            ..KafkaConfig::default()
        };
        let parts = cfg.partitions as i32;
        let deliver_topic = iris_bus::topics::deliver(&cfg.region);
        let presence_topic = iris_bus::topics::presence(&cfg.region);
        let topics = vec![
            (deliver_topic.clone(), parts),
            (presence_topic.clone(), parts),
        ];
        ensure_topics(&kafka, &topics)?;
        let store =
            Arc::new(MessageStore::open(&cfg.data_dir)?.with_dedup_ttl_secs(cfg.dedup_ttl_secs));
        let session_cfg = SessionConfig::with_url(cfg.redis_url.clone());
        let sessions = SessionReader::new(&session_cfg)?;
        let lookups = Lookups::start(&session_cfg)?;
        let (producer, mut rings) = KafkaProducer::start(&kafka, 1)?;
        let ring = rings.pop().ok_or(CoreError::ThreadPanicked)?;
        let consumer = open_consumer(&cfg, &kafka)?;
        let partitions = topic_partitions(&consumer, &deliver_topic)?;
        let presence_partitions = topic_partitions(&consumer, &presence_topic)?;
        let assigned = owned_partitions(partitions, cfg.member, cfg.members);
        if assigned.is_empty() {
            warn!(
                partitions,
                member = cfg.member,
                members = cfg.members,
                "no deliver partition falls to this member, it consumes nothing"
            );
        }
        // A user's presence events share its deliver partition's number when both topics have
        // the same count; otherwise every presence partition may hold this member's users.
        let presence_assigned: Vec<i32> = if presence_partitions == partitions {
            assigned.clone()
        } else {
            (0..presence_partitions as i32).collect()
        };
        let mut tpl = TopicPartitionList::with_capacity(assigned.len() + presence_assigned.len());
        // A committed offset beyond the end of a log the broker lost is not followed.
        let own: Vec<(String, i32)> = assigned
            .iter()
            .map(|&p| (deliver_topic.clone(), p))
            .collect();
        let starts = start_offsets(&consumer, &own, Duration::from_secs(5));
        for (&p, start) in assigned.iter().zip(starts.offsets) {
            tpl.add_partition_offset(&deliver_topic, p, start)?;
        }
        let offset_guard = starts.guard;
        for &p in &presence_assigned {
            // Never committed: the cache covers the events seen since this start.
            tpl.add_partition_offset(&presence_topic, p, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        info!(
            region = %cfg.region,
            member = cfg.member,
            members = cfg.members,
            partitions,
            assigned = ?assigned,
            presence_partitions = ?presence_assigned,
            topic = %deliver_topic,
            "iris-core assigned its deliver partitions"
        );
        // What was read last from each deliver partition: the keeper checks that the logs are
        // still those (another process may have re-created the topics first).
        let read_marks = ReadMarks::new(&deliver_topic);
        let keeper = match TopicKeeper::start_watching(
            &kafka,
            topics,
            KEEPER_EVERY,
            Some((Arc::clone(&read_marks), MARKS_EVERY)),
        ) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "topic keeper not started, lost topics are not re-created");
                None
            }
        };
        let syncer = Syncer::start(Arc::clone(&store))?;
        let (global, importer) = match &cfg.global {
            Some(g) => {
                let gcfg = KafkaConfig {
                    client_id: format!("iris-core-{}-{}-global", cfg.region, cfg.member),
                    linger_ms: 1,
                    ..g.clone()
                };
                let (gp, mut grings) = KafkaProducer::start(&gcfg, 1)?;
                let gring = grings.pop().ok_or(CoreError::ThreadPanicked)?;
                let importer = Importer::start(
                    ImportConfig {
                        homes: Arc::clone(&cfg.homes),
                        regional: KafkaConfig {
                            client_id: format!("iris-import-{}-{}", cfg.region, cfg.member),
                            ..kafka.clone()
                        },
                        global: KafkaConfig {
                            client_id: format!("iris-import-{}-{}-global", cfg.region, cfg.member),
                            linger_ms: 1,
                            fetch_wait_max_ms: cfg.fetch_wait_max_ms,
                            ..g.clone()
                        },
                        deliver_partitions: partitions,
                        partitions: cfg.partitions,
                        member: cfg.member,
                        members: cfg.members,
                    },
                    Arc::new(ImportStats::default()),
                )?;
                (Some((gp, gring)), Some(importer))
            }
            None => (None, None),
        };
        let region_stats = Arc::new(RegionStats::default());
        let stats = Arc::new(ServiceStats::default());
        let hops = Arc::new(CoreHops::default());
        let frames = Arc::new(FrameStats::new());
        let producer = Arc::new(Mutex::new(Some(producer)));
        let (rehome_tx, rehome_asks) = mpsc::channel();
        let admin = match cfg.admin {
            Some(addr) => Some(Admin::start(
                addr,
                AdminView {
                    stats: Arc::clone(&stats),
                    hops: Arc::clone(&hops),
                    frames: Arc::clone(&frames),
                    producer: Arc::clone(&producer),
                    store: Arc::clone(&store),
                    partitions,
                    assigned: assigned.len(),
                    regions: Arc::clone(&region_stats),
                    import: importer.as_ref().map(|i| Arc::clone(i.stats())),
                    rehome: Mutex::new(rehome_tx),
                },
            )?),
            None => None,
        };
        let recreations = keeper
            .as_ref()
            .map(|k| RecreationCursor::new(k.recreations(), &[&deliver_topic, &presence_topic]));
        Ok(CoreService {
            cfg,
            deliver_topic,
            presence_topic,
            partitions,
            assigned,
            consumer,
            producer,
            ring,
            store,
            sessions,
            frames,
            stats,
            hops,
            window: Window::default(),
            inflight: VecDeque::new(),
            next_seq: 1,
            synced: 0,
            sent_expiry,
            expiry,
            syncer,
            tickets: HashMap::new(),
            next_ticket: 1,
            done: Vec::new(),
            hints: HashMap::new(),
            hints_pruned: Instant::now(),
            online: HashMap::new(),
            resets: HashMap::new(),
            retry: VecDeque::new(),
            retry_bytes: 0,
            redis_down_since: None,
            retried: Instant::now(),
            outage_ended: None,
            lookups,
            inboxes: HashMap::new(),
            admin,
            recreations,
            read_marks,
            keeper,
            logged_consume_error: false,
            offset_guard,
            logged_session_error: false,
            global,
            routes: HashMap::new(),
            region_stats,
            importer,
            roamers: HashMap::new(),
            acked: AckedMemory::default(),
            rehome_asks: Some(rehome_asks),
            rehome: None,
        })
    }

    /// The importer's counters (multi-region only).
    pub fn import_stats(&self) -> Option<&Arc<ImportStats>> {
        self.importer.as_ref().map(Importer::stats)
    }

    /// Frames sent to the global bus per target region.
    pub fn region_stats(&self) -> &Arc<RegionStats> {
        &self.region_stats
    }

    /// The service's counters.
    pub fn stats(&self) -> &Arc<ServiceStats> {
        &self.stats
    }

    /// The service's per-hop latency histograms.
    pub fn hops(&self) -> &Arc<CoreHops> {
        &self.hops
    }

    /// Decode outcomes of the consumed records (bad frames are `invalid`/`unknown_version`).
    pub fn frame_counts(&self) -> FrameCounts {
        self.frames.counts()
    }

    /// Partitions of the deliver topic, as the broker reported them at start.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The deliver partitions this member consumes, ascending.
    pub fn assigned(&self) -> &[i32] {
        &self.assigned
    }

    /// The bound address of the admin endpoint (the real port when 0 was asked).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// The line `iris-core` prints on stdout once started:
    /// `iris-core ready region=R member=I/N partitions=P assigned=a,b,c[ admin=ADDR]`.
    pub fn ready_line(&self) -> String {
        let assigned: Vec<String> = self.assigned.iter().map(i32::to_string).collect();
        let mut line = format!(
            "iris-core ready region={} member={}/{} partitions={} assigned={}",
            self.cfg.region,
            self.cfg.member,
            self.cfg.members,
            self.partitions,
            assigned.join(",")
        );
        if let Some(addr) = self.admin_addr() {
            let _ = write!(line, " admin={addr}");
        }
        line
    }

    /// Consumes until `stop` is set, then closes the last window and waits (at most
    /// 5 s) for every closed window's fsync and acks, committing their offsets
    /// synchronously, and flushes the producer (at most 5 s). Windows still waiting then keep
    /// their offsets uncommitted: their records come again at the next start. The admin
    /// endpoint answers `/health` with 503 from then on and stops when this returns.
    ///
    /// When the broker lost the region's topics ([`CoreError::TopicsLost`]) it returns at once
    /// after an fsync of the store, leaking the service: its librdkafka handles may hang when
    /// destroyed, and the caller is to exit (`iris-core` exits with status 75).
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), CoreError> {
        let result = self.consume(stop).and_then(|()| self.finish());
        if let Err(lost @ CoreError::TopicsLost { .. }) = result {
            if let Some(a) = &self.admin {
                a.stopping.store(true, Ordering::Release);
            }
            if let Err(e) = self.store.sync() {
                warn!(error = %e, "store not synced before the restart");
            }
            std::mem::forget(self);
            return Err(lost);
        }
        if let Some(a) = &self.admin {
            a.stopping.store(true, Ordering::Release);
        }
        // A rehome waiting for its answer is told; the messages not yet moved stay stored.
        if let Some(job) = self.rehome.take() {
            let _ = job.reply.try_send((
                "503 Service Unavailable",
                format!(
                    "iris-core is stopping: moved {} of the user's messages, the rest stay stored here; ask again after the restart\n",
                    job.moved
                ),
            ));
        }
        self.rehome_asks = None;
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(p), Ok(())) = (producer, &result) {
            match p.flush_and_stop(Duration::from_secs(5)) {
                Ok(s) => debug!(produced = s.produced_ok, "kafka producer flushed"),
                Err(e) => {
                    warn!(error = %e, "kafka producer not flushed at shutdown; the messages stay stored")
                }
            }
        }
        if let Some((p, _)) = self.global.take() {
            if let Err(e) = p.flush_and_stop(Duration::from_secs(5)) {
                warn!(error = %e, "global bus producer not flushed at shutdown; the messages stay stored");
            }
        }
        let imported = match self.importer.take() {
            Some(i) => i.stop(),
            None => Ok(()),
        };
        let result = result.and(imported);
        if let Some(k) = self.keeper.take() {
            k.stop();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        result?;
        let s = &self.stats;
        let f = self.frames.counts();
        info!(
            records = s.records.load(Ordering::Relaxed),
            delivers = s.delivers.load(Ordering::Relaxed),
            acks = s.acks.load(Ordering::Relaxed),
            drains = s.drains.load(Ordering::Relaxed),
            routed = s.routed.load(Ordering::Relaxed),
            relays = s.relays.load(Ordering::Relaxed),
            bad_frames = f.invalid + f.unknown_version,
            "iris-core stopped"
        );
        Ok(())
    }

    /// Closes the last window and waits for the closed windows to be committed.
    fn finish(&mut self) -> Result<(), CoreError> {
        self.close_window()?;
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            self.progress(CommitMode::Sync)?;
            if self.inflight.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                warn!(
                    windows = self.inflight.len(),
                    outputs = self.tickets.len(),
                    "windows not acknowledged at shutdown; their records come again at the next start"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The consume loop of [`Self::run`], up to `stop`.
    fn consume(&mut self, stop: &AtomicBool) -> Result<(), CoreError> {
        while !stop.load(Ordering::Acquire) {
            self.check_recreated()?;
            // Whole milliseconds, at least one: rdkafka-rs hands librdkafka whole milliseconds
            // and loops until its deadline, so a sub-millisecond rest would be spent spinning.
            let mut timeout = match self.window.started {
                Some(t) => {
                    let rest = self.cfg.commit_window.saturating_sub(t.elapsed());
                    Duration::from_millis(rest.as_micros().div_ceil(1000).max(1) as u64)
                }
                None => Duration::from_millis(100),
            };
            if !self.inflight.is_empty() {
                // Acks are polled, not signalled: look again soon.
                timeout = timeout.min(ACK_POLL);
            }
            if self.rehome.is_some() {
                // A rehome step waits for the global broker's acks: look again soon.
                timeout = timeout.min(ACK_POLL);
            }
            if self.lookups.asked {
                // Take the retry lookup's answer soon after it comes.
                timeout = timeout.min(ACK_POLL * 5);
            } else if !self.retry.is_empty() {
                timeout = timeout.min(RETRY_EVERY);
            }
            let full = self.inflight.len() >= MAX_INFLIGHT_WINDOWS
                || self.tickets.len() >= MAX_INFLIGHT_OUTPUTS;
            if full {
                // Backpressure: the broker is not acknowledging; stop consuming until it does.
                std::thread::sleep(ACK_POLL);
            } else {
                self.poll_one(timeout)?;
            }
            let due = self
                .window
                .started
                .is_some_and(|t| t.elapsed() >= self.cfg.commit_window);
            if due || self.window.records >= self.cfg.max_batch {
                self.close_window()?;
            }
            self.retry_routes();
            self.progress(CommitMode::Async)?;
            self.rehome_step()?;
            self.sweep_sent();
            self.sweep_expired();
        }
        Ok(())
    }

    /// One bounded turn ([`SweepSchedule`]) of the messages' expiry: messages older than
    /// `message_ttl_secs` (ids carry their accept time) are deleted with the next window's
    /// batch. Drains already skip them ([`Self::drain`]).
    fn sweep_expired(&mut self) {
        let now = Instant::now();
        if !self.expiry.is_due(now) {
            return;
        }
        let (min_live, cursor) = self.expiry.start();
        let next = match self.store.sweep_expired(&cursor, min_live, SWEEP_BUDGET) {
            Ok(turn) => {
                if !turn.expired.is_empty() {
                    self.stats
                        .expired_deleted
                        .fetch_add(turn.expired.len() as u64, Ordering::Relaxed);
                    self.window
                        .deletes
                        .extend(turn.expired.into_iter().map(|(user, id, _)| (user, id)));
                    self.window.started.get_or_insert(now);
                }
                turn.next
            }
            Err(e) => {
                debug!(error = %e, "message expiry sweep failed");
                None
            }
        };
        self.expiry.done(now, next);
    }

    /// One bounded turn ([`SweepSchedule`]) of the v2 dedup records' expiry: records older
    /// than `dedup_ttl_secs` (ids carry their mint time) are deleted with the next window's
    /// batch.
    fn sweep_sent(&mut self) {
        let now = Instant::now();
        if !self.sent_expiry.is_due(now) {
            return;
        }
        let (min_live, cursor) = self.sent_expiry.start();
        if cursor.is_empty() {
            // A new pass: whole buckets first, then the records of older builds.
            match self.store.drop_expired_sent(min_live) {
                Ok(n) => {
                    self.stats.dedup_expired.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => debug!(error = %e, "dedup bucket expiry failed"),
            }
        }
        let next = match self.store.expired_sent(&cursor, min_live, SWEEP_BUDGET) {
            Ok((expired, next)) => {
                if !expired.is_empty() {
                    self.stats
                        .dedup_expired
                        .fetch_add(expired.len() as u64, Ordering::Relaxed);
                    self.window.sent_expired.extend(expired);
                    self.window.started.get_or_insert(now);
                }
                next
            }
            Err(e) => {
                debug!(error = %e, "dedup expiry sweep failed");
                None
            }
        };
        self.sent_expiry.done(now, next);
    }

    /// Fails with [`CoreError::TopicsLost`] once the keeper re-created the deliver or presence
    /// topic (the broker lost them: a memory-storage restart). A re-created topic is a new log
    /// that must be read from its beginning, and librdkafka (2.12) cannot follow it in place:
    /// after the broker re-creates a topic under the same name its consumer crashes, fetches
    /// nothing after a seek, or hangs when destroyed. [`Self::run`] then returns at once and
    /// the process exits for its supervisor to restart it: the restarted core creates a new
    /// consumer, which reads the new logs from their beginning (nothing is committed there).
    ///
    /// Likewise when the importer stopped because the global broker lost the route topic
    /// ([`Importer::lost_topics`]).
    fn check_recreated(&mut self) -> Result<(), CoreError> {
        if let Some(topics) = self.importer.as_ref().and_then(Importer::lost_topics) {
            return Err(CoreError::TopicsLost { topics });
        }
        let Some(c) = &mut self.recreations else {
            return Ok(());
        };
        let topics = c.take();
        if topics.is_empty() {
            return Ok(());
        }
        Err(CoreError::TopicsLost { topics })
    }

    /// Polls one record (at most `timeout`) and applies it.
    fn poll_one(&mut self, timeout: Duration) -> Result<(), CoreError> {
        match self.consumer.poll(timeout) {
            None => {}
            Some(Err(e)) => {
                self.offset_guard.on_error(&e);
                if !self.logged_consume_error {
                    self.logged_consume_error = true;
                    warn!(error = %e, "kafka consume error (logged once)");
                } else {
                    debug!(error = %e, "kafka consume error");
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
                // Handled before this start (or sought back to an earlier batch).
            }
            Some(Ok(msg)) => {
                let (partition, offset) = (msg.partition(), msg.offset());
                let presence = msg.topic() == self.presence_topic;
                // Copied out: the record borrows the consumer, the handler needs `self`.
                let payload = msg.payload().unwrap_or_default().to_vec();
                if !presence {
                    let timestamp = msg.timestamp().to_millis().unwrap_or(-1);
                    self.read_marks.note(partition, offset, timestamp, &payload);
                }
                drop(msg);
                if presence {
                    self.stats.records.fetch_add(1, Ordering::Relaxed);
                    self.handle_presence(&payload);
                } else {
                    if tracing::enabled!(tracing::Level::TRACE) {
                        let id = match iris_bus::decode(&payload) {
                            Ok(ArchivedBusFrame::Deliver(d)) => d.id.to_native(),
                            _ => 0,
                        };
                        trace!(partition, offset, id, "deliver topic record consumed");
                    }
                    self.window.started.get_or_insert_with(Instant::now);
                    self.handle(payload)?;
                    self.window.records += 1;
                    self.window.offsets.insert(partition, offset + 1);
                }
            }
        }
        Ok(())
    }

    /// Applies one record of the presence topic to the presence cache.
    fn handle_presence(&mut self, record: &[u8]) {
        let Ok(frame) = decode_counted(&self.frames, record) else {
            return;
        };
        match frame {
            ArchivedBusFrame::Presence(p) => {
                self.stats.presence.fetch_add(1, Ordering::Relaxed);
                let node = p.node.to_native();
                let unix_ms = p.unix_ms.to_native();
                if self.resets.get(&node).is_some_and(|&r| unix_ms < r) {
                    // Stamped before that node restarted: stale.
                    return;
                }
                let user = p.user.as_slice();
                if p.online {
                    if let Some(entry) = self.online.get_mut(user) {
                        match entry.nodes.iter_mut().find(|(n, _)| *n == node) {
                            Some(e) => e.1 = e.1.max(unix_ms),
                            None => entry.nodes.push((node, unix_ms)),
                        }
                    } else if self.online.len() < MAX_CACHED_USERS {
                        self.online.insert(
                            user.to_vec(),
                            CacheEntry {
                                nodes: vec![(node, unix_ms)],
                                merged: false,
                            },
                        );
                    } else {
                        self.stats.cache_full.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(entry) = self.online.get_mut(user) {
                    // A logout older than the login it would undo is stale.
                    entry.nodes.retain(|&(n, at)| n != node || at > unix_ms);
                    if entry.nodes.is_empty() {
                        // Unknown again: the next route asks Redis, which may know a session
                        // older than this process.
                        self.online.remove(user);
                    }
                }
                self.stats
                    .cached_users
                    .store(self.online.len() as u64, Ordering::Relaxed);
            }
            ArchivedBusFrame::EdgeReset(r) => {
                let node = r.node.to_native();
                let unix_ms = r.unix_ms.to_native();
                self.stats.edge_resets.fetch_add(1, Ordering::Relaxed);
                let last = self.resets.entry(node).or_insert(0);
                *last = (*last).max(unix_ms);
                self.online.retain(|_, entry| {
                    entry.nodes.retain(|&(n, at)| n != node || at > unix_ms);
                    !entry.nodes.is_empty()
                });
                // A hint recorded after the reset (a login on the restarted node whose drain
                // request was consumed before this late reset) stays.
                self.hints
                    .retain(|_, (n, _, at_ms)| *n != node || *at_ms > unix_ms);
                self.stats
                    .cached_users
                    .store(self.online.len() as u64, Ordering::Relaxed);
                self.stats
                    .hints_held
                    .store(self.hints.len() as u64, Ordering::Relaxed);
                debug!(node, unix_ms, "edge reset: its sessions and hints dropped");
            }
            _ => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies one record (its raw bytes) to the window.
    fn handle(&mut self, record: Vec<u8>) -> Result<(), CoreError> {
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        // decode_counted counts the failure and logs its first occurrence.
        let Ok(archived) = decode_counted(&self.frames, &record) else {
            return Ok(());
        };
        let frame = match to_owned(archived) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e, "bus frame not deserialized, skipped");
                return Ok(());
            }
        };
        let core_bound = !matches!(
            frame,
            BusFrame::Presence(_)
                | BusFrame::DrainChunk(_)
                | BusFrame::PrekeyBundle(_)
                | BusFrame::EdgeReset(_)
                | BusFrame::Route(_)
                | BusFrame::Stored(_)
                | BusFrame::Confirmed(_)
        );
        if core_bound && !storable_user(frame.key_user()) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            debug!(
                kind = frame.kind().name(),
                user_len = frame.key_user().len(),
                "frame with an empty or oversized user, skipped"
            );
            return Ok(());
        }
        match frame {
            BusFrame::Deliver(mut d) => {
                if d.sender.len() > MAX_SENDER_LEN {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        sender_len = d.sender.len(),
                        "deliver with an oversized sender, skipped"
                    );
                    return Ok(());
                }
                self.hops.consumed.record_id(d.id);
                let hint = self.hint(&d.recipient);
                if !self.cfg.homes.is_home(&d.recipient)
                    && self.global.is_some()
                    && !d.origin.starts_with(VISITOR_MARK)
                {
                    // Not a visitor copy: a message for a user whose home moved away, sent by an
                    // edge or importer with the old home table. Stored nowhere yet: forward it.
                    let home = self.cfg.homes.home_of(&d.recipient).to_owned();
                    self.stats.forwarded_home.fetch_add(1, Ordering::Relaxed);
                    debug!(id = d.id, home = %home, "deliver for a user homed elsewhere, forwarded to its home");
                    let (key, id) = (d.recipient.clone(), d.id);
                    return self.route_global(home, key, Routed::Deliver(d), id);
                }
                if !self.cfg.homes.is_home(&d.recipient) {
                    // A live copy for a visitor, sent by its home: never stored here.
                    self.stats.visitors.fetch_add(1, Ordering::Relaxed);
                    self.window.outputs.push(Output::Visitor {
                        recipient: d.recipient,
                        id: d.id,
                        record,
                        hint,
                    });
                    return Ok(());
                }
                if let Some(to) = d.confirm.take() {
                    if !self.confirm(&d, *to)? {
                        // A v2 resend: confirmed with the first id, not stored or routed.
                        return Ok(());
                    }
                }
                let key = (d.recipient.clone(), d.id);
                if self.acked.contains(&key.0, key.1) {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        id = d.id,
                        "deliver of a message acked lately, not stored again"
                    );
                    return Ok(());
                }
                self.stats.delivers.fetch_add(1, Ordering::Relaxed);
                self.window.acked.remove(&key);
                if let Some(region) = self.roamer(&d.recipient) {
                    // Marked as a visitor copy, so the roaming region does not forward it back.
                    let copy = Deliver {
                        origin: format!("{VISITOR_MARK}{}", d.origin),
                        confirm: None,
                        ..d.clone()
                    };
                    self.route_global(region, d.recipient.clone(), Routed::Deliver(copy), d.id)?;
                }
                self.window.outputs.push(Output::Route {
                    recipient: d.recipient.clone(),
                    id: d.id,
                    record,
                    hint,
                });
                self.window.inserts.insert(
                    key,
                    StoredMsg {
                        id: d.id,
                        recipient: d.recipient,
                        sender: d.sender,
                        payload: d.payload,
                        kind: d.kind,
                    },
                );
            }
            BusFrame::Relay(r) => {
                self.stats.relays.fetch_add(1, Ordering::Relaxed);
                let hint = self.hint(&r.recipient);
                if let Some(region) = self.roamer(&r.recipient) {
                    self.route_global(region, r.recipient.clone(), Routed::Relay(r.clone()), 0)?;
                }
                self.window.outputs.push(Output::Relay {
                    recipient: r.recipient,
                    record,
                    hint,
                });
            }
            BusFrame::Ack(a) => {
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                let key = (a.user, a.id);
                let cancelled = self.window.inserts.remove(&key).is_some();
                if cancelled {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                // A redelivered message may already be in the store: delete it if it is there.
                // Earlier windows are written (`write_pending` is synchronous), so a miss means
                // no tombstone is needed; a failed lookup deletes anyway (harmless).
                match self.store.payload_len(&key.0, key.1) {
                    Ok(None) => {
                        if !cancelled {
                            self.stats.acks_not_stored.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(_)) | Err(_) => self.window.deletes.push(key.clone()),
                }
                self.acked.insert(&key.0, key.1);
                self.window.acked.insert(key);
            }
            BusFrame::DrainRequest(r) => {
                if self.is_foreign(&r.region) {
                    self.record_roamer(&r.user, &r.region, r.node);
                } else if r.after == 0 {
                    self.record_hint(&r.user, r.node);
                    // Logged in here again: no longer roaming.
                    if self.roamers.remove(&r.user).is_some() {
                        self.stats
                            .roamers
                            .store(self.roamers.len() as u64, Ordering::Relaxed);
                    }
                }
                self.drain(r)?;
            }
            BusFrame::PrekeyPut(p) => {
                self.stats.prekey_puts.fetch_add(1, Ordering::Relaxed);
                self.window.prekeys.insert(p.user, p.bundle);
            }
            BusFrame::PrekeyFetch(f) => self.prekey_fetch(f)?,
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

    /// The v2 dedup of a deliver that asked for a [`Confirmed`]: `false` when its
    /// `(sender, client id)` was seen before with another id (a resend: confirmed with the
    /// first id, to be neither stored nor routed); else the record is kept with the window and
    /// the confirm queued for the window's fsync. A second copy of the same message (same id:
    /// the sender edge's outbox replay, or a record consumed again after a crash) is stored
    /// (the same bytes) and confirmed again.
    fn confirm(&mut self, d: &Deliver, to: ConfirmTo) -> Result<bool, CoreError> {
        let key = (d.sender.clone(), to.client);
        let first = match self.window.sent.get(&key) {
            Some(id) => Some(*id),
            None => self.store.sent_id(&key.0, key.1)?,
        };
        let duplicate = first.is_some_and(|first| first != d.id);
        if duplicate {
            self.stats.resends.fetch_add(1, Ordering::Relaxed);
            debug!(id = d.id, "v2 resend, confirmed with the first id");
        } else if first.is_none() {
            self.window.sent.insert(key, d.id);
        }
        let node = to.node;
        let confirmed = Confirmed {
            sender: d.sender.clone(),
            to,
            id: first.unwrap_or(d.id),
            duplicate,
        };
        let out = if self.is_foreign(&d.origin) {
            let routed = BusFrame::Route(Route {
                region: d.origin.clone(),
                inner: Routed::Confirmed(confirmed),
            });
            Output::Global {
                region: d.origin.clone(),
                key: d.sender.clone(),
                payload: encode(&routed).map_err(CoreError::Encode)?,
                id: 0,
            }
        } else {
            Output::Frame {
                node,
                key: d.sender.clone(),
                payload: encode(&BusFrame::Confirmed(confirmed)).map_err(CoreError::Encode)?,
            }
        };
        self.window.confirms.push(out);
        // The window must close (and be fsynced) even if nothing else is in it.
        self.window.started.get_or_insert_with(Instant::now);
        Ok(!duplicate)
    }

    /// Produces the confirms of every closed window that is durable now (ticketed in their
    /// window: its offsets commit once the broker has them, so a crash confirms again).
    fn send_confirms(&mut self) {
        let mut ready = Vec::new();
        for w in &mut self.inflight {
            if w.seq > self.synced {
                break;
            }
            if !w.confirms.is_empty() {
                ready.push((w.seq, std::mem::take(&mut w.confirms)));
            }
        }
        for (seq, confirms) in ready {
            let mut sent = 0;
            for o in confirms {
                self.stats.confirms.fetch_add(1, Ordering::Relaxed);
                sent += self.route(o, None, seq);
            }
            if let Some(w) = self.inflight.iter_mut().find(|w| w.seq == seq) {
                w.waiting += sent;
            }
        }
    }

    /// Whether `region` names another region this process can answer across the global bus.
    fn is_foreign(&self, region: &str) -> bool {
        !region.is_empty() && region != self.cfg.region && self.global.is_some()
    }

    /// The region `user` roams in (a roamer entry younger than [`ROAMER_TTL`]).
    fn roamer(&self, user: &[u8]) -> Option<String> {
        match self.roamers.get(user) {
            Some(r) if r.since.elapsed() < ROAMER_TTL => {
                debug!(region = %r.region, node = r.node, "copy to a roaming user's region");
                Some(r.region.clone())
            }
            _ => None,
        }
    }

    /// Remembers that `user` (homed here) logged in on edge `node` of `region`.
    fn record_roamer(&mut self, user: &[u8], region: &str, node: u32) {
        debug!(region, node, "roamer recorded");
        self.roamers.insert(
            user.to_vec(),
            Roamer {
                region: region.to_owned(),
                node,
                since: Instant::now(),
            },
        );
        self.stats
            .roamers
            .store(self.roamers.len() as u64, Ordering::Relaxed);
    }

    /// Queues `Route{region, inner}` for the global bus (message `id`, 0 for none), keyed by
    /// `key`.
    fn route_global(
        &mut self,
        region: String,
        key: Vec<u8>,
        inner: Routed,
        id: u64,
    ) -> Result<(), CoreError> {
        match &inner {
            Routed::Deliver(d) if d.origin.starts_with(VISITOR_MARK) => {
                self.stats.roamed.fetch_add(1, Ordering::Relaxed);
            }
            Routed::Relay(_) => {
                self.stats.roamed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        let payload = encode(&BusFrame::Route(Route {
            region: region.clone(),
            inner,
        }))
        .map_err(CoreError::Encode)?;
        self.window.outputs.push(Output::Global {
            region,
            key,
            payload,
            id,
        });
        Ok(())
    }

    /// One bounded step of the rehome in progress (or starts the next asked one): deletes what
    /// the global broker acknowledged since the last step, sends the next [`REHOME_STEP`]
    /// stored messages once the previous ones are all reported (then the prekeys), and answers
    /// when nothing is left to send or to wait for. Never waits on the broker.
    fn rehome_step(&mut self) -> Result<(), CoreError> {
        if self.rehome.is_none() {
            let Some(asks) = &self.rehome_asks else {
                return Ok(());
            };
            match asks.try_recv() {
                Ok(ask) => self.start_rehome(ask)?,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return Ok(()),
            }
        }
        let Some(mut job) = self.rehome.take() else {
            return Ok(());
        };
        if !job.acked.is_empty() {
            let acked = std::mem::take(&mut job.acked);
            let deletes: Vec<(Vec<u8>, u64)> = acked
                .iter()
                .filter(|&&id| id != 0)
                .map(|&id| (job.user.clone(), id))
                .collect();
            // Deleted only now that the new home's bus holds them: a crash before this line
            // leaves them stored, and the next rehome sends them again (the new home stores a
            // message once per (recipient, id)).
            self.store.write(
                &Batch {
                    deletes: &deletes,
                    ..Batch::default()
                },
                true,
            )?;
            job.moved += deletes.len() as u64;
            self.stats
                .rehomed
                .fetch_add(deletes.len() as u64, Ordering::Relaxed);
            if acked.contains(&0) {
                self.store.delete_prekeys(&job.user, true)?;
                job.prekeys_moved = true;
                self.stats.rehomed_prekeys.fetch_add(1, Ordering::Relaxed);
            }
        }
        if job.in_flight.is_empty() && !job.scanned {
            let msgs = self
                .store
                .scan_messages(&job.user, job.after, REHOME_STEP)?;
            job.scanned = msgs.len() < REHOME_STEP;
            for m in msgs {
                job.after = m.id;
                let payload = encode(&BusFrame::Route(Route {
                    region: job.home.clone(),
                    inner: Routed::Deliver(Deliver {
                        id: m.id,
                        recipient: m.recipient,
                        sender: m.sender,
                        payload: m.payload,
                        origin: self.cfg.region.clone(),
                        kind: m.kind,
                        confirm: None,
                    }),
                }))
                .map_err(CoreError::Encode)?;
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                job.in_flight.insert(ticket, m.id);
                self.produce_global(&job.home, &job.user, payload, ticket);
            }
        }
        if job.in_flight.is_empty() && job.scanned && !job.prekeys_sent {
            job.prekeys_sent = true;
            if let Some(bundle) = self.store.get_prekeys(&job.user)? {
                let payload = encode(&BusFrame::Route(Route {
                    region: job.home.clone(),
                    inner: Routed::PrekeyPut(PrekeyPut {
                        user: job.user.clone(),
                        bundle,
                    }),
                }))
                .map_err(CoreError::Encode)?;
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                job.in_flight.insert(ticket, 0);
                self.produce_global(&job.home, &job.user, payload, ticket);
            }
        }
        if !(job.scanned && job.prekeys_sent && job.in_flight.is_empty() && job.acked.is_empty()) {
            self.rehome = Some(job);
            return Ok(());
        }
        let user = String::from_utf8_lossy(&job.user).into_owned();
        let prekeys = if job.prekeys_moved { 1 } else { 0 };
        info!(
            home = %job.home,
            moved = job.moved,
            prekeys,
            failed = job.failed,
            ms = job.started.elapsed().as_millis() as u64,
            "rehome finished"
        );
        let answer = if job.failed == 0 {
            (
                "200 OK",
                format!(
                    "moved {} messages and {prekeys} prekey bundles of {user} to {}\n",
                    job.moved, job.home
                ),
            )
        } else {
            (
                "503 Service Unavailable",
                format!(
                    "moved {} messages and {prekeys} prekey bundles of {user} to {}; {} copies were not acknowledged by the global bus and stay stored here: ask again\n",
                    job.moved, job.home, job.failed
                ),
            )
        };
        let _ = job.reply.try_send(answer);
        Ok(())
    }

    /// Checks a rehome request and starts it, or answers it at once: `409` while this core's
    /// home table still homes the user here (or in a single-region deployment), `421` naming
    /// the member that owns the user's partition, `400` for an invalid user.
    fn start_rehome(&mut self, ask: RehomeAsk) -> Result<(), CoreError> {
        let user = String::from_utf8_lossy(&ask.user).into_owned();
        let refuse = |status: &'static str, body: String| {
            let _ = ask.reply.try_send((status, body));
        };
        if !storable_user(&ask.user) {
            refuse(
                "400 Bad Request",
                "rehome needs ?user=U, 1 to 65535 bytes, percent-encoded\n".to_owned(),
            );
            return Ok(());
        }
        if self.global.is_none() {
            refuse(
                "409 Conflict",
                format!("single-region deployment: {user} has no other home to move to\n"),
            );
            return Ok(());
        }
        let home = self.cfg.homes.home_of(&ask.user).to_owned();
        if home == self.cfg.region {
            refuse(
                "409 Conflict",
                format!(
                    "the home table of this core still homes {user} in {home} (this region): edit the home table on every edge and core of every region, restart them, then ask again\n"
                ),
            );
            return Ok(());
        }
        let partition = iris_bus::topics::partition_of(&ask.user, self.partitions) as i32;
        if !self.assigned.contains(&partition) {
            let owner = partition as u32 % self.cfg.members;
            refuse(
                "421 Misdirected Request",
                format!(
                    "{user} is on partition {partition} of {}, owned by member {owner} of {} (this is member {}): ask member {owner}'s admin endpoint\n",
                    self.deliver_topic, self.cfg.members, self.cfg.member
                ),
            );
            return Ok(());
        }
        // Messages of the open window are in the store before the scan.
        self.write_pending()?;
        info!(home = %home, "rehome started");
        self.rehome = Some(RehomeJob {
            user: ask.user,
            home,
            reply: ask.reply,
            after: 0,
            in_flight: HashMap::new(),
            acked: Vec::new(),
            scanned: false,
            prekeys_sent: false,
            moved: 0,
            prekeys_moved: false,
            failed: 0,
            started: Instant::now(),
        });
        Ok(())
    }

    /// The node of `user`'s login hint, if it is younger than [`HINT_TTL`].
    fn hint(&self, user: &[u8]) -> Option<u32> {
        match self.hints.get(user) {
            Some(&(node, at, _)) if at.elapsed() < HINT_TTL => Some(node),
            _ => None,
        }
    }

    /// Remembers that `user` started a login on edge `node` now.
    fn record_hint(&mut self, user: &[u8], node: u32) {
        let now = Instant::now();
        if let Some(h) = self.hints.get_mut(user) {
            *h = (node, now, unix_ms());
            return;
        }
        if self.hints.len() >= MAX_HINTS {
            self.stats.hints_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.hints.insert(user.to_vec(), (node, now, unix_ms()));
        self.stats
            .hints_held
            .store(self.hints.len() as u64, Ordering::Relaxed);
    }

    /// Drops the hints older than [`HINT_TTL`], at most once per [`HINT_PRUNE_EVERY`].
    fn prune_hints(&mut self) {
        if self.hints_pruned.elapsed() < HINT_PRUNE_EVERY {
            return;
        }
        self.hints_pruned = Instant::now();
        if !self.hints.is_empty() {
            self.hints.retain(|_, (_, at, _)| at.elapsed() < HINT_TTL);
        }
        if !self.roamers.is_empty() {
            self.roamers.retain(|_, r| r.since.elapsed() < ROAMER_TTL);
            self.stats
                .roamers
                .store(self.roamers.len() as u64, Ordering::Relaxed);
        }
        self.stats
            .hints_held
            .store(self.hints.len() as u64, Ordering::Relaxed);
    }

    /// Writes the pending window (not fsynced), so a read sees every earlier record.
    fn write_pending(&mut self) -> Result<(), CoreError> {
        let inserts: Vec<StoredMsg> = std::mem::take(&mut self.window.inserts)
            .into_values()
            .collect();
        let deletes = std::mem::take(&mut self.window.deletes);
        let prekeys: Vec<(Vec<u8>, Vec<u8>)> = std::mem::take(&mut self.window.prekeys)
            .into_iter()
            .collect();
        let sent: Vec<SentRecord> = std::mem::take(&mut self.window.sent)
            .into_iter()
            .map(|((sender, client), id)| SentRecord { sender, client, id })
            .collect();
        let sent_expired = std::mem::take(&mut self.window.sent_expired);
        self.store.write(
            &Batch {
                inserts: &inserts,
                deletes: &deletes,
                prekeys: &prekeys,
                sent: &sent,
                sent_expired: &sent_expired,
                ..Batch::default()
            },
            false,
        )
    }

    fn drain(&mut self, r: DrainRequest) -> Result<(), CoreError> {
        self.stats.drains.fetch_add(1, Ordering::Relaxed);
        self.write_pending()?;
        let limit = (r.limit as usize).clamp(1, MAX_DRAIN_CHUNK);
        // Expired messages are never drained (the sweep deletes them).
        let min_live =
            crate::api::min_live_id(iris_bus::hops::unix_micros(), self.cfg.message_ttl_secs);
        let after = r.after.max(min_live.saturating_sub(1));
        let (msgs, more) = self.drain_page(&r.user, after, limit)?;
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
                    kind: m.kind,
                })
                .collect(),
            more,
        });
        if self.is_foreign(&r.region) {
            self.stats.foreign_answers.fetch_add(1, Ordering::Relaxed);
            let BusFrame::DrainChunk(c) = chunk else {
                return Ok(());
            };
            return self.route_global(r.region, r.user, Routed::DrainChunk(c), 0);
        }
        let payload = encode(&chunk).map_err(CoreError::Encode)?;
        self.window.outputs.push(Output::Frame {
            node: r.node,
            key: r.user,
            payload,
        });
        Ok(())
    }

    /// `user`'s stored messages after `after` for one chunk: at most `limit`, and at most
    /// [`MAX_DRAIN_CHUNK_BYTES`] of payload and sender (but at least one message), read in
    /// pages of [`DRAIN_PAGE`]; and whether more are stored after the last one.
    fn drain_page(
        &self,
        user: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<(Vec<StoredMsg>, bool), CoreError> {
        let mut out: Vec<StoredMsg> = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = after;
        loop {
            let page = self.store.scan_messages(user, cursor, DRAIN_PAGE)?;
            let short = page.len() < DRAIN_PAGE;
            for m in page {
                let size = m.payload.len() + m.sender.len();
                if out.len() >= limit || (!out.is_empty() && bytes + size > MAX_DRAIN_CHUNK_BYTES) {
                    return Ok((out, true));
                }
                cursor = m.id;
                bytes += size;
                out.push(m);
            }
            if short {
                return Ok((out, false));
            }
        }
    }

    fn prekey_fetch(&mut self, f: PrekeyFetch) -> Result<(), CoreError> {
        self.stats.prekey_fetches.fetch_add(1, Ordering::Relaxed);
        // A put of this window (same user, same partition, earlier offset) must be seen.
        self.write_pending()?;
        let bundle = self.store.get_prekeys(&f.user)?;
        debug!(
            node = f.node,
            found = bundle.is_some(),
            "prekey fetch answered"
        );
        let bundle = PrekeyBundle {
            user: f.user.clone(),
            node: f.node,
            shard: f.shard,
            conn: f.conn,
            bundle,
        };
        if self.is_foreign(&f.region) {
            self.stats.foreign_answers.fetch_add(1, Ordering::Relaxed);
            return self.route_global(f.region, f.user, Routed::PrekeyBundle(bundle), 0);
        }
        let answer = BusFrame::PrekeyBundle(bundle);
        let payload = encode(&answer).map_err(CoreError::Encode)?;
        self.window.outputs.push(Output::Frame {
            node: f.node,
            key: f.user,
            payload,
        });
        Ok(())
    }

    /// Closes the window: writes it (not fsynced) and asks the fsync thread to make it durable,
    /// hands its outputs to the producer with tickets, and queues its offsets until both are
    /// done ([`Self::progress`]).
    fn close_window(&mut self) -> Result<(), CoreError> {
        self.prune_hints();
        if self.window.started.is_none() && self.window.offsets.is_empty() {
            return Ok(());
        }
        self.write_pending()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.syncer.ask(seq)?;
        let window = std::mem::take(&mut self.window);
        let waiting = self.produce_outputs(window.outputs, &window.acked, seq);
        self.inflight.push_back(Inflight {
            seq,
            offsets: window.offsets,
            waiting,
            confirms: window.confirms,
        });
        Ok(())
    }

    /// Takes the fsync answers and the producer's reports, then commits (with `mode`) the
    /// offsets of the oldest closed windows that are both durable and fully acknowledged,
    /// strictly in window order.
    fn progress(&mut self, mode: CommitMode) -> Result<(), CoreError> {
        while let Ok(r) = self.syncer.done.try_recv() {
            // A failed fsync stops the service, offsets uncommitted.
            self.synced = self.synced.max(r?);
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        self.send_confirms();
        let mut done = std::mem::take(&mut self.done);
        self.ring.take_done(&mut done);
        if let Some((_, g)) = &self.global {
            g.take_done(&mut done);
        }
        for d in done.drain(..) {
            if let Some(job) = &mut self.rehome {
                if let Some(id) = job.in_flight.remove(&d.ticket) {
                    if d.acked {
                        job.acked.push(id);
                    } else {
                        job.failed += 1;
                        self.stats.rehome_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            }
            let Some((seq, id)) = self.tickets.remove(&d.ticket) else {
                continue;
            };
            if d.acked {
                if id != 0 {
                    self.hops.routed.record_id(id);
                }
            } else {
                self.stats.outputs_failed.fetch_add(1, Ordering::Relaxed);
            }
            if seq == NO_WINDOW {
                continue;
            }
            if let Some(front) = self.inflight.front().map(|w| w.seq) {
                if let Some(w) = seq
                    .checked_sub(front)
                    .and_then(|i| self.inflight.get_mut(i as usize))
                {
                    w.waiting = w.waiting.saturating_sub(1);
                }
            }
        }
        self.done = done;
        self.stats
            .outputs_waiting
            .store(self.tickets.len() as u64, Ordering::Relaxed);
        self.stats
            .windows_waiting
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        let mut offsets: HashMap<i32, i64> = HashMap::new();
        while self
            .inflight
            .front()
            .is_some_and(|w| w.seq <= self.synced && w.waiting == 0)
        {
            if let Some(w) = self.inflight.pop_front() {
                offsets.extend(w.offsets);
            }
        }
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (partition, next) in &offsets {
            tpl.add_partition_offset(&self.deliver_topic, *partition, Offset::Offset(*next))?;
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            // The records come again after a restart (at-least-once).
            debug!(error = %e, "kafka offset commit refused, records may come again");
            if matches!(mode, CommitMode::Sync) {
                warn!(error = %e, "final offset commit refused, records will come again");
            }
        }
        Ok(())
    }

    /// Routes a closed window's outputs; returns how many ticketed frames it produced for
    /// window `seq`. Routes and relays whose recipient is not in the presence cache while Redis
    /// fails wait in the retry queue instead.
    fn produce_outputs(
        &mut self,
        outputs: Vec<Output>,
        acked: &HashSet<(Vec<u8>, u64)>,
        seq: u64,
    ) -> usize {
        if outputs.is_empty() {
            return 0;
        }
        let outputs: Vec<Output> = outputs
            .into_iter()
            .filter(|o| match o {
                Output::Route { recipient, id, .. } => !acked.contains(&(recipient.clone(), *id)),
                _ => true,
            })
            .collect();
        let sessions = if self.redis_down_since.is_some() {
            // Redis failed lately: only the retry loop asks it (every RETRY_EVERY).
            None
        } else {
            self.session_nodes(&outputs)
        };
        let mut sent = 0;
        for o in outputs {
            sent += self.route(o, sessions.as_ref(), seq);
        }
        sent
    }

    /// Routes one output (tickets for window `seq`); returns the frames produced. A route or
    /// relay with no cached entry and no Redis answer (`sessions` is `None`) is kept for a
    /// retry.
    fn route(
        &mut self,
        o: Output,
        sessions: Option<&HashMap<Vec<u8>, Vec<u32>>>,
        seq: u64,
    ) -> usize {
        match o {
            Output::Frame { node, key, payload } => {
                self.send_to(&[node], &key, payload, seq, 0);
                1
            }
            Output::Global {
                region,
                key,
                payload,
                id,
            } => self.send_global(&region, &key, payload, seq, id),
            Output::Route { .. } | Output::Relay { .. } | Output::Visitor { .. } => {
                let recipient = o.recipient().unwrap_or_default();
                let Some(targets) = self.targets(recipient, o.hint(), sessions) else {
                    self.keep_for_retry(o);
                    return 0;
                };
                match o {
                    Output::Route {
                        recipient,
                        id,
                        record,
                        ..
                    } => {
                        if targets.is_empty() {
                            trace!(id, "no session known: stored only");
                            self.stats.offline.fetch_add(1, Ordering::Relaxed);
                            return 0;
                        }
                        trace!(id, nodes = ?targets, window = seq, "routed");
                        self.stats
                            .routed
                            .fetch_add(targets.len() as u64, Ordering::Relaxed);
                        self.send_to(&targets, &recipient, record, seq, id);
                    }
                    Output::Relay {
                        recipient, record, ..
                    } => {
                        if targets.is_empty() {
                            self.stats.relays_dropped.fetch_add(1, Ordering::Relaxed);
                            return 0;
                        }
                        self.stats
                            .relays_routed
                            .fetch_add(targets.len() as u64, Ordering::Relaxed);
                        self.send_to(&targets, &recipient, record, seq, 0);
                    }
                    Output::Visitor {
                        recipient,
                        id,
                        record,
                        ..
                    } => {
                        if targets.is_empty() {
                            self.stats.visitor_dropped.fetch_add(1, Ordering::Relaxed);
                            return 0;
                        }
                        self.stats
                            .visitors_routed
                            .fetch_add(targets.len() as u64, Ordering::Relaxed);
                        self.send_to(&targets, &recipient, record, seq, id);
                    }
                    Output::Frame { .. } | Output::Global { .. } => return 0,
                }
                targets.len()
            }
        }
    }

    /// Keeps a route or relay for the next lookup retry; the oldest is dropped (counted) beyond
    /// [`MAX_RETRY`] entries or [`MAX_RETRY_BYTES`] (a dropped route's message stays stored).
    fn keep_for_retry(&mut self, o: Output) {
        self.stats.retry_queued.fetch_add(1, Ordering::Relaxed);
        self.retry_bytes += o.held_bytes();
        self.retry.push_back(o);
        while self.retry.len() > MAX_RETRY || self.retry_bytes > MAX_RETRY_BYTES {
            let Some(old) = self.retry.pop_front() else {
                break;
            };
            self.retry_bytes = self.retry_bytes.saturating_sub(old.held_bytes());
            self.stats.retry_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .retry_held
            .store(self.retry.len() as u64, Ordering::Relaxed);
    }

    /// Asks the lookup thread for the held routes' users every [`RETRY_EVERY`] (one lookup at a
    /// time); when an answer works, routes every held route whose user it covers (outside any
    /// window: their messages are stored already) and marks Redis up again. Never blocks.
    fn retry_routes(&mut self) {
        while let Ok((users, result)) = self.lookups.answers.try_recv() {
            self.lookups.asked = false;
            match result {
                Ok(records) => {
                    let refs: Vec<&[u8]> = users.iter().map(Vec::as_slice).collect();
                    let sessions = self.apply_lookup(&refs, records);
                    let asked: HashSet<&[u8]> = refs.iter().copied().collect();
                    let pending: Vec<Output> = self.retry.drain(..).collect();
                    self.retry_bytes = 0;
                    // A Redis that comes back empty is refilled by the edges' resync: a user
                    // without a session just after the outage may get one in a moment.
                    let grace =
                        self.outage_ended.get_or_insert_with(Instant::now).elapsed() < RESYNC_GRACE;
                    let mut routed = 0u64;
                    for o in pending {
                        let covered = o
                            .recipient()
                            .is_some_and(|u| asked.contains(u) || self.online.contains_key(u));
                        let unknown = grace
                            && o.hint().is_none()
                            && o.recipient().is_some_and(|u| {
                                !self.online.contains_key(u) && !sessions.contains_key(u)
                            });
                        if covered && !unknown {
                            routed += 1;
                            self.route(o, Some(&sessions), NO_WINDOW);
                        } else {
                            // Held after the lookup was asked (the next one covers it), or no
                            // session yet during the grace.
                            self.retry_bytes += o.held_bytes();
                            self.retry.push_back(o);
                        }
                    }
                    self.stats.retry_routed.fetch_add(routed, Ordering::Relaxed);
                    if self.retry.is_empty() {
                        self.outage_ended = None;
                    } else {
                        // Routes held after the ask, or without a session during the grace:
                        // windows keep holding (their order stays) until a later lookup
                        // covers them.
                        self.redis_down_since.get_or_insert_with(Instant::now);
                    }
                    debug!(
                        routes = routed,
                        "session lookup works again, held routes routed"
                    );
                }
                Err(e) => {
                    self.stats.session_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "session lookup retry failed");
                }
            }
            self.stats
                .retry_held
                .store(self.retry.len() as u64, Ordering::Relaxed);
        }
        if self.retry.is_empty() || self.lookups.asked || self.retried.elapsed() < RETRY_EVERY {
            return;
        }
        self.retried = Instant::now();
        let mut users: Vec<Vec<u8>> = self
            .retry
            .iter()
            .filter_map(Output::recipient)
            .map(<[u8]>::to_vec)
            .collect();
        users.sort_unstable();
        users.dedup();
        self.stats.session_lookups.fetch_add(1, Ordering::Relaxed);
        if let Some(ask) = &self.lookups.ask {
            self.lookups.asked = ask.send(users).is_ok();
        }
    }

    /// The distinct target nodes of a deliver or relay to `recipient`: the nodes of its
    /// presence-cache entry when it has one (merged with its Redis session's once, by
    /// [`Self::session_nodes`]), else its Redis session's (`sessions`; `None` when the lookup
    /// failed: no answer), plus the login hint's node.
    fn targets(
        &self,
        recipient: &[u8],
        hint: Option<u32>,
        sessions: Option<&HashMap<Vec<u8>, Vec<u32>>>,
    ) -> Option<Vec<u32>> {
        let mut t: Vec<u32> = match self.online.get(recipient) {
            Some(entry) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                entry.nodes.iter().map(|&(n, _)| n).collect()
            }
            None => sessions?.get(recipient).cloned().unwrap_or_default(),
        };
        if let Some(h) = hint {
            if !t.contains(&h) {
                self.stats.hinted_routes.fetch_add(1, Ordering::Relaxed);
                t.push(h);
            }
        }
        Some(t)
    }

    /// The nodes of this region holding online sessions of the recipients of `outputs` that
    /// are not in the presence cache (one pipelined Redis lookup, none when every recipient is
    /// cached and merged); `None` when the lookup fails (then Redis is marked down until a
    /// retry works). The lookup also covers the cached users not merged yet: their sessions
    /// from before this process started (another device) join their entry, once.
    fn session_nodes(&mut self, outputs: &[Output]) -> Option<HashMap<Vec<u8>, Vec<u32>>> {
        let mut users: Vec<&[u8]> = outputs
            .iter()
            .filter_map(Output::recipient)
            .filter(|u| !self.online.get(*u).is_some_and(|e| e.merged))
            .collect();
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return Some(HashMap::new());
        }
        self.stats.session_lookups.fetch_add(1, Ordering::Relaxed);
        match self.sessions.get_many(&users) {
            Ok(records) => Some(self.apply_lookup(&users, records)),
            Err(e) => {
                self.stats.session_errors.fetch_add(1, Ordering::Relaxed);
                self.redis_down_since.get_or_insert_with(Instant::now);
                if !self.logged_session_error {
                    self.logged_session_error = true;
                    warn!(error = %e, "session lookup failed, routes kept and retried");
                } else {
                    debug!(error = %e, "session lookup failed");
                }
                None
            }
        }
    }

    /// Takes a working lookup's answer: Redis is up again; the nodes of cached users join their
    /// entry (once); returns the nodes of the uncached users with an online session here.
    fn apply_lookup(
        &mut self,
        users: &[&[u8]],
        records: Vec<Option<SessionRecord>>,
    ) -> HashMap<Vec<u8>, Vec<u32>> {
        if self.logged_session_error {
            self.logged_session_error = false;
            info!("session lookup works again");
        }
        self.redis_down_since = None;
        let mut nodes = HashMap::new();
        for (u, rec) in users.iter().zip(records) {
            let online = rec
                .map(|r| r.online_nodes(&self.cfg.region))
                .unwrap_or_default();
            if let Some(entry) = self.online.get_mut(*u) {
                // Login time unknown (0): any logout or reset of that node removes it.
                for n in online {
                    if !entry.nodes.iter().any(|&(m, _)| m == n) {
                        entry.nodes.push((n, 0));
                    }
                }
                entry.merged = true;
            } else if !online.is_empty() {
                nodes.insert(u.to_vec(), online);
            }
        }
        nodes
    }

    /// Produces `payload` once to the inbox (partition 0) of each node of `nodes`, each copy
    /// ticketed for window `seq` (message `id`, 0 for none).
    fn send_to(&mut self, nodes: &[u32], key: &[u8], payload: Vec<u8>, seq: u64, id: u64) {
        let Some((&last, rest)) = nodes.split_last() else {
            return;
        };
        for &node in rest {
            let frame = self.frame(node, key, payload.clone(), seq, id);
            self.send(frame);
        }
        let frame = self.frame(last, key, payload, seq, id);
        self.send(frame);
    }

    /// A ticketed frame for the inbox of `node`.
    fn frame(&mut self, node: u32, key: &[u8], payload: Vec<u8>, seq: u64, id: u64) -> OutFrame {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, (seq, id));
        OutFrame {
            topic: self.inbox(node),
            partition: 0,
            key: Some(key.to_vec()),
            payload,
            ticket,
        }
    }

    /// Produces `payload` (an encoded `Route`) to `region`'s route topic on the global bus,
    /// on the partition of `key`, ticketed for window `seq`; returns the frames produced (0 in
    /// a single-region deployment, which has no global bus).
    fn send_global(
        &mut self,
        region: &str,
        key: &[u8],
        payload: Vec<u8>,
        seq: u64,
        id: u64,
    ) -> usize {
        if self.global.is_none() {
            return 0;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, (seq, id));
        self.produce_global(region, key, payload, ticket)
    }

    /// Hands `payload` (an encoded `Route`) for `region`'s route topic, partition of `key`, to
    /// the global producer with `ticket`, waiting while its ring is full; returns the frames
    /// produced (0 without a global bus).
    fn produce_global(&mut self, region: &str, key: &[u8], payload: Vec<u8>, ticket: u64) -> usize {
        if self.global.is_none() {
            return 0;
        }
        let topic = Arc::clone(
            self.routes
                .entry(region.to_owned())
                .or_insert_with(|| Arc::from(iris_bus::topics::route(region))),
        );
        let mut frame = OutFrame {
            topic,
            partition: iris_bus::topics::partition_of(key, self.cfg.partitions) as i32,
            key: Some(key.to_vec()),
            payload,
            ticket,
        };
        self.region_stats.count(region);
        let Some((_, ring)) = &self.global else {
            return 0;
        };
        loop {
            match ring.try_send(frame) {
                Ok(()) => return 1,
                Err(f) => {
                    frame = f;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    /// The inbox topic of edge `node`.
    fn inbox(&mut self, node: u32) -> Arc<str> {
        let region = &self.cfg.region;
        Arc::clone(
            self.inboxes
                .entry(node)
                .or_insert_with(|| Arc::from(iris_bus::topics::edge_inbox(region, node))),
        )
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

/// Milliseconds since the Unix epoch, by this host's clock.
fn unix_ms() -> u64 {
    iris_bus::hops::unix_micros() / 1000
}

/// Whether `user` can key a store record: not empty, not longer than [`MAX_USER_LEN`].
fn storable_user(user: &[u8]) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN
}

/// Opens the core's consumer: manual assignment, offsets kept in the member's group and
/// committed by the core, a fetch wait of `fetch_wait_max_ms`.
fn open_consumer(cfg: &ServiceConfig, kafka: &KafkaConfig) -> Result<BaseConsumer, CoreError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &kafka.client_id)
        .set("group.id", &cfg.group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // tansu answers a waiting fetch only at this deadline (librdkafka's default is
        // 500 ms): keep it short so a frame waits at most this long in the broker.
        .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
        .set("socket.nagle.disable", "true")
        .set("log_level", "3")
        .create()?)
}

/// The partition count of `topic` per the broker's metadata, waiting up to [`METADATA_WAIT`]
/// for the topic (just created, maybe) to show with its partitions.
pub(crate) fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Result<u32, CoreError> {
    let start = Instant::now();
    loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(md) => {
                if let Some(t) = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                {
                    if !t.partitions().is_empty() {
                        return Ok(t.partitions().len() as u32);
                    }
                }
                if start.elapsed() >= METADATA_WAIT {
                    return Err(CoreError::Kafka(KafkaError::MetadataFetch(
                        RDKafkaErrorCode::UnknownTopicOrPartition,
                    )));
                }
                debug!(topic, "deliver topic not in the metadata yet, retrying");
            }
            Err(e) if start.elapsed() >= METADATA_WAIT => return Err(e.into()),
            Err(e) => debug!(error = %e, topic, "kafka metadata not answered yet, retrying"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the admin endpoint reads at scrape time.
struct AdminView {
    stats: Arc<ServiceStats>,
    hops: Arc<CoreHops>,
    frames: Arc<FrameStats>,
    producer: Arc<Mutex<Option<KafkaProducer>>>,
    store: Arc<MessageStore>,
    partitions: u32,
    assigned: usize,
    regions: Arc<RegionStats>,
    import: Option<Arc<ImportStats>>,
    /// Hands `POST /rehome` requests to the consume loop.
    rehome: Mutex<Sender<RehomeAsk>>,
}

/// The admin endpoint's thread.
struct Admin {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` (so the caller learns the real port) and serves it on a thread.
    fn start(addr: SocketAddr, view: AdminView) -> Result<Admin, CoreError> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        // Non-blocking accept, polled, so the thread sees `closed` and ends.
        listener.set_nonblocking(true)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (stop_flag, closed_flag) = (Arc::clone(&stopping), Arc::clone(&closed));
        let view = Arc::new(view);
        // Requests being answered on their own threads (a rehome waits for the consume loop;
        // scrapes go on meanwhile). Beyond ADMIN_THREADS, requests are answered inline.
        let busy = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("iris-core-admin".to_owned())
            .spawn(move || {
                while !closed_flag.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if busy.load(Ordering::Acquire) < ADMIN_THREADS {
                                busy.fetch_add(1, Ordering::AcqRel);
                                let (view, stop, busy2) =
                                    (Arc::clone(&view), Arc::clone(&stop_flag), Arc::clone(&busy));
                                let spawned = std::thread::Builder::new()
                                    .name("iris-core-admin-req".to_owned())
                                    .spawn(move || {
                                        if let Err(e) = serve(s, &view, &stop) {
                                            debug!(error = %e, "admin request failed");
                                        }
                                        busy2.fetch_sub(1, Ordering::AcqRel);
                                    });
                                if let Err(e) = spawned {
                                    busy.fetch_sub(1, Ordering::AcqRel);
                                    debug!(error = %e, "admin request thread not started");
                                }
                            } else if let Err(e) = serve(s, &view, &stop_flag) {
                                debug!(error = %e, "admin request failed");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            debug!(error = %e, "admin accept failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        info!(addr = %addr, "iris-core admin endpoint serving /metrics and /health");
        Ok(Admin {
            addr,
            stopping,
            closed,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    fn stop(mut self) {
        self.closed.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Answers one HTTP request (see [`crate::http::answer_admin_with`]): `GET /metrics`,
/// `GET /health`, `POST /rehome?user=U`.
fn serve(s: TcpStream, view: &AdminView, stopping: &AtomicBool) -> std::io::Result<()> {
    let stopping = stopping.load(Ordering::Acquire).then_some("stopping");
    crate::http::answer_admin_with(
        s,
        || render_metrics(view),
        stopping,
        |target| {
            let path = target.split('?').next().unwrap_or("");
            (path == "/rehome").then(|| rehome(view, target, stopping.is_some()))
        },
    )
}

/// `POST /rehome?user=U`: hands the request to the consume loop and waits for its answer (at
/// most [`REHOME_ANSWER_WAIT`]).
fn rehome(view: &AdminView, target: &str, stopping: bool) -> AdminAnswer {
    if stopping {
        return (
            "503 Service Unavailable",
            "iris-core is stopping\n".to_owned(),
        );
    }
    let Some(user) = crate::http::query_param(target, "user") else {
        return (
            "400 Bad Request",
            "rehome needs ?user=U (percent-encoded)\n".to_owned(),
        );
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let sent = view
        .rehome
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(RehomeAsk { user, reply });
    if sent.is_err() {
        return (
            "503 Service Unavailable",
            "iris-core is stopping\n".to_owned(),
        );
    }
    match answer.recv_timeout(REHOME_ANSWER_WAIT) {
        Ok(a) => a,
        Err(mpsc::RecvTimeoutError::Timeout) => (
            "504 Gateway Timeout",
            "the move goes on; ask again to see what is left\n".to_owned(),
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => (
            "503 Service Unavailable",
            "iris-core stopped before the move finished; the rest stays stored: ask again\n"
                .to_owned(),
        ),
    }
}

/// Appends one metric family with a single unlabelled sample.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// The Prometheus text of `/metrics`.
fn render_metrics(view: &AdminView) -> String {
    let mut out = String::with_capacity(4096);
    for c in view.stats.counters() {
        metric(
            &mut out,
            &format!("iris_core_{}_total", c.name),
            "counter",
            c.help.trim(),
            c.value,
        );
    }
    let f = view.frames.counts();
    out.push_str(
        "# HELP iris_core_bus_frames_total Consumed records by bus frame decode outcome.\n",
    );
    out.push_str("# TYPE iris_core_bus_frames_total counter\n");
    for (outcome, v) in [
        ("ok", f.ok),
        ("invalid", f.invalid),
        ("unknown_version", f.unknown_version),
    ] {
        let _ = writeln!(
            out,
            "iris_core_bus_frames_total{{outcome=\"{outcome}\"}} {v}"
        );
    }
    metric(
        &mut out,
        "iris_core_login_hints",
        "gauge",
        "Login hints held now.",
        view.stats.hints_held.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "iris_core_cached_users",
        "gauge",
        "Users in the presence cache now.",
        view.stats.cached_users.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "iris_core_retry_held",
        "gauge",
        "Routes and relays held for a session lookup retry now.",
        view.stats.retry_held.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "iris_core_windows_waiting",
        "gauge",
        "Closed windows waiting for their fsync or broker acks before their offsets commit.",
        view.stats.windows_waiting.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "iris_core_outputs_waiting",
        "gauge",
        "Routed copies and answers handed to the producer and not yet acknowledged.",
        view.stats.outputs_waiting.load(Ordering::Relaxed),
    );
    out.push_str(
        "# HELP iris_core_hop_seconds Age of a message (from its accept time) at each core hop.\n",
    );
    out.push_str("# TYPE iris_core_hop_seconds histogram\n");
    view.hops
        .consumed
        .snapshot()
        .render(&mut out, "iris_core_hop_seconds", "consumed");
    view.hops
        .routed
        .snapshot()
        .render(&mut out, "iris_core_hop_seconds", "routed");
    if let Some(i) = &view.import {
        i.hop_imported
            .snapshot()
            .render(&mut out, "iris_core_hop_seconds", "imported");
        i.hop_stored_at_home
            .snapshot()
            .render(&mut out, "iris_core_hop_seconds", "stored_at_home");
    }
    metric(
        &mut out,
        "iris_core_roamers",
        "gauge",
        "Users homed here logged in in another region (roamer entries) now.",
        view.stats.roamers.load(Ordering::Relaxed),
    );
    out.push_str(
        "# HELP iris_core_routed_out_total Frames sent to the global bus, per target region.\n",
    );
    out.push_str("# TYPE iris_core_routed_out_total counter\n");
    for (region, v) in view.regions.routed_out() {
        let _ = writeln!(out, "iris_core_routed_out_total{{region=\"{region}\"}} {v}");
    }
    if let Some(i) = &view.import {
        out.push_str("# HELP iris_core_imported_total Route records imported from the global bus, per origin region.\n");
        out.push_str("# TYPE iris_core_imported_total counter\n");
        for (region, v) in i.imported() {
            let _ = writeln!(out, "iris_core_imported_total{{region=\"{region}\"}} {v}");
        }
        for (name, kind, help, v) in [
            ("import_lag_records", "gauge", "Route records on the global bus not yet imported (high watermark minus position, summed).", i.lag.load(Ordering::Relaxed)),
            ("import_misrouted_total", "counter", "Route records naming another region, skipped.", i.misrouted.load(Ordering::Relaxed)),
            ("import_skipped_total", "counter", "Route records that did not decode or carried nothing importable, skipped.", i.skipped.load(Ordering::Relaxed)),
            ("import_resent_total", "counter", "Regional produces refused and sent again by the importer.", i.resent.load(Ordering::Relaxed)),
            ("import_pending", "gauge", "Imported records waiting for the regional broker's acknowledgement.", i.pending.load(Ordering::Relaxed)),
            ("stored_sent_total", "counter", "Stored notices sent back to the origin region.", i.stored_sent.load(Ordering::Relaxed)),
            ("stored_seen_total", "counter", "Stored notices received for this region's messages.", i.stored_seen.load(Ordering::Relaxed)),
            ("import_batch_seeks_total", "counter", "Route partitions sought back to an earlier batch at a start (the broker answered from past the committed offset).", i.batch_seeks.load(Ordering::Relaxed)),
            ("import_broker_repeats_total", "counter", "Route records the broker sent again in one pass, dropped.", i.broker_repeats.load(Ordering::Relaxed)),
        ] {
            metric(&mut out, &format!("iris_core_{name}"), kind, help, v);
        }
    }
    metric(
        &mut out,
        "iris_core_partitions",
        "gauge",
        "Partitions of the deliver topic.",
        u64::from(view.partitions),
    );
    metric(
        &mut out,
        "iris_core_assigned_partitions",
        "gauge",
        "Deliver partitions this member consumes.",
        view.assigned as u64,
    );
    metric(
        &mut out,
        "iris_core_store_corrupt_skipped_total",
        "counter",
        "Corrupt stored values skipped by reads.",
        view.store.corrupt_skipped(),
    );
    let producer = view
        .producer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(KafkaProducer::stats);
    if let Some(p) = producer {
        for (name, kind, help, v) in [
            (
                "frames_in_total",
                "counter",
                "Frames handed to the producer.",
                p.frames_in,
            ),
            (
                "produced_ok_total",
                "counter",
                "Frames acknowledged by the broker.",
                p.produced_ok,
            ),
            (
                "delivery_errors_total",
                "counter",
                "Failed deliveries (retried unless rejected).",
                p.delivery_errors,
            ),
            (
                "rejected_total",
                "counter",
                "Frames dropped because they can never be produced.",
                p.rejected,
            ),
            (
                "queue_full_events_total",
                "counter",
                "Stretches with the client queue full.",
                p.queue_full_events,
            ),
            (
                "ring_full_total",
                "counter",
                "Sends refused because the producer ring was full.",
                p.ring_full,
            ),
            (
                "client_errors_total",
                "counter",
                "Client-level errors reported by the Kafka client.",
                p.client_errors,
            ),
            (
                "in_flight",
                "gauge",
                "Frames handed to the Kafka client and not yet acknowledged.",
                p.in_flight,
            ),
            (
                "pending",
                "gauge",
                "Frames held by the producer thread for a (re)send.",
                p.pending,
            ),
        ] {
            metric(
                &mut out,
                &format!("iris_core_producer_{name}"),
                kind,
                help,
                v,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_the_partitions() {
        assert_eq!(owned_partitions(4, 0, 2), vec![0, 2]);
        assert_eq!(owned_partitions(4, 1, 2), vec![1, 3]);
        assert_eq!(owned_partitions(5, 0, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(owned_partitions(3, 5, 8), Vec::<i32>::new());
        let mut all: Vec<i32> = (0..3).flat_map(|m| owned_partitions(16, m, 3)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>(), "every partition once");
    }

    #[test]
    fn config_validation() {
        let mut cfg = ServiceConfig::new("b:1", "redis://r:1", "eu-west", "/d");
        assert!(cfg.validate().is_ok());
        assert_eq!((cfg.member, cfg.members, cfg.admin), (0, 1, None));
        cfg.members = 0;
        assert!(matches!(cfg.validate(), Err(CoreError::InvalidInput(_))));
        cfg.members = 2;
        cfg.member = 2;
        assert!(matches!(cfg.validate(), Err(CoreError::InvalidInput(_))));
        cfg.member = 1;
        assert!(cfg.validate().is_ok());
        let single = cfg.clone();
        cfg.region = "global".to_owned();
        assert!(matches!(cfg.validate(), Err(CoreError::InvalidInput(_))));

        // Regions: homes of the same region, global brokers exactly when multi-region.
        let regions = vec!["eu-west".to_owned(), "ap-south".to_owned()];
        let homes = Homes::new("eu-west", &regions, HashMap::new()).unwrap();
        let mut multi = single.clone();
        multi.homes = Arc::new(homes.clone());
        let e = multi.validate().unwrap_err().to_string();
        assert!(e.contains("global brokers are required"), "{e}");
        multi.global = Some(KafkaConfig {
            brokers: "g:1".into(),
            ..KafkaConfig::default()
        });
        multi.validate().unwrap();
        let mut wrong = multi.clone();
        wrong.region = "ap-south".into();
        assert!(wrong.validate().is_err(), "homes built for another region");
        let mut lone = single;
        lone.global = multi.global.clone();
        assert!(lone.validate().is_err(), "a global bus with one region");
    }

    #[test]
    fn acked_memory_remembers_the_latest_keys_only() {
        let mut m = AckedMemory::default();
        m.insert(b"alice", 1);
        assert!(m.contains(b"alice", 1));
        assert!(!m.contains(b"bob", 1), "another recipient");
        assert!(!m.contains(b"alice", 2));
        m.insert(b"alice", 1);
        assert_eq!(m.order.len(), 1, "a key is held once");
        for i in 0..ACKED_MEMORY as u64 {
            m.insert(b"bob", 10 + i);
        }
        assert!(
            !m.contains(b"alice", 1),
            "the oldest key left beyond ACKED_MEMORY"
        );
        assert!(m.contains(b"bob", 10 + ACKED_MEMORY as u64 - 1));
        assert_eq!(m.keys.len(), ACKED_MEMORY);
    }

    #[test]
    fn every_counter_is_listed_once_with_help() {
        let stats = ServiceStats::default();
        stats.hinted_routes.fetch_add(3, Ordering::Relaxed);
        let counters = stats.counters();
        assert_eq!(counters.len(), 44);
        let mut names: Vec<&str> = counters.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), counters.len());
        assert!(counters.iter().all(|c| !c.help.trim().is_empty()));
        let hinted = counters.iter().find(|c| c.name == "hinted_routes").unwrap();
        assert_eq!(hinted.value, 3);
    }
}
