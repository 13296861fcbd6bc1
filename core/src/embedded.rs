//! The in-process core of the embedded deployment: one dedicated OS thread ("iris-core") that
//! owns the [`MessageStore`] and serves every edge shard over its [`ShardLink`].
//!
//! # Queues
//! [`EmbeddedCore::start`] creates, per shard, one bounded request queue (shard → core) and one
//! bounded reply queue (core → shard), each used by exactly one producer and one consumer. The
//! core thread takes requests from all shards (a crossbeam `Select` when idle, non-blocking
//! sweeps when busy) and never blocks on a reply queue: a reply that finds its queue full waits
//! in a per-shard overflow list and is retried (in order) until the shard takes it; replies are
//! never dropped while the shard's receiver exists.
//!
//! # Group commit and the accept → store window
//! A [`CoreRequest::Store`] is held **in memory only** for at most `commit_window_ms` (default
//! 2 ms) after the edge accepted it (the request's `accepted`; or after the end of the commit
//! before the store was taken in, if that is later; a store that waited longer than the window
//! in a full queue is due as soon as it is taken in). Every other pending operation (the delete
//! of an acked stored message, a prekey bundle, a dedup record, the id floor) waits at most
//! `commit_window_ms` after it became pending. When the first of these deadlines comes, all
//! surviving inserts, the deletes of acked messages, pending prekey bundles and the id floor go
//! to disk as ONE atomic fjall batch followed by an fsync. The id floor is leased: when an id
//! passes the floor last written, the floor written is one second of id clock ahead of it, so
//! messages all acked inside their windows write nothing. This is the bounded "accept → store"
//! window of DESIGN.md: a crash of the process loses the messages accepted in the last window
//! and not yet acked (the recipient got them live or gets nothing; the sender is never told
//! otherwise); everything committed before survives (fjall journal recovery).
//!
//! If an ack arrives while its message is still pending, the message is dropped without ever
//! touching disk (`cancelled_before_store`). Each message has its own window: one accepted
//! late in another's window is not written when that window closes, only if its own closes
//! unacked. Under sparse traffic, whose acks come well within the window, the core thus
//! commits only for the few messages acked late, not every window. An ack for an already
//! committed message becomes a delete in the next batch (a message committed in the last one to
//! two seconds is known to be stored without a lookup: `acks_of_recent_stores`, see "Acks of
//! messages not stored"), and is remembered for 1–2 s (two generations of a recent-acks set,
//! rotated every second), because stores and acks travel on different shards' queues: a store
//! that arrives after its own ack is dropped (`late_stores_dropped`) instead of being kept
//! forever. A store later than that is kept and delivered again at the next login (a duplicate,
//! never a loss).
//!
//! # The hot tier
//! With `hot_log_secs` > 0 (default 1), the commit writes its new messages and v2 dedup records
//! to the hot log ([`crate::hotlog`]: one append and `fdatasync`, so they are as durable as in
//! the LSM, a record in the same atomic frame as its message) and keeps them in memory, instead
//! of inserting them into the LSM; v2 sends are confirmed once that frame is synced. An
//! ack of a hot message removes it from memory and logs its delete at the next commit
//! (`acks_of_hot`); the LSM never sees it. A hot message not acked within one to two periods is
//! moved into the LSM in one durable batch per hot log file (`hot_moved`), and remembered as
//! recently stored; the file's dedup records move with it, acked or not. Drains, the quota,
//! duplicate stores and resends see the hot messages and records as they see stored ones. The
//! id floor rides in every hot frame, so a commit with only hot work writes nothing to the LSM. At start the hot log is replayed into the LSM before anything is served;
//! at shutdown every hot message is moved into it. This exists for the load where acks miss the
//! 2 ms window by a little: writing each message into the LSM and deleting it moments later
//! (a memtable insert and a tombstone, then a flush and a compaction of both) cost about 12 µs
//! of this thread per message, which on an edge that shares the core with a shard kept it from
//! ever catching up once it fell behind.
//!
//! # Client message ids (protocol v2)
//! A [`CoreRequest::Store`] may carry the sender's client message id (`client`, an
//! idempotency key unique per sender). The core then answers [`CoreReply::Confirms`] instead of
//! [`CoreReply::Refused`], and keeps `(sender, client) -> id` as a dedup record in the store
//! (the `sent` keyspace, see [`crate::store`]), written in the SAME atomic batch as the
//! message:
//! - not seen before: the message is pending as usual, and so is its record; once the commit's
//!   fsync succeeded the sender gets [`Confirmed::Stored`]. A failed commit gives
//!   [`Confirmed::Refused`] (`store_unavailable`) and writes no record; over quota gives
//!   `recipient_inbox_full` and keeps no record. Acked before it was written (ack
//!   cancellation), it is [`Confirmed::Stored`] at once, but its record stays pending and is
//!   written by the next commit, so a resend is still known.
//! - pending (sent again in the same window): [`Confirmed::Duplicate`] with the first id, after
//!   the commit that makes the first durable (at once if it is already settled by an ack); it
//!   is never stored twice. If that commit fails, the resend is refused like the first.
//! - in the store (sent before, even before a restart): [`Confirmed::Duplicate`] with the
//!   first id, at the end of this pass (`duplicate_sends` counts every duplicate).
//!
//! The in-memory part (pending records) is bounded by the pending window like every other
//! pending operation. Records live `dedup_ttl_secs` (default 24 h) and at most an eighth more:
//! ids carry their mint time, and the store keeps records in time buckets of an eighth of the
//! TTL ([`crate::store`]), so a sibling of the expiry sweep deletes each bucket whole once its
//! last id is older than [`min_live_id`]`(now, dedup_ttl_secs)` (`dedup_expired` counts the
//! records, approximately); the records of builds before the buckets are deleted in bounded
//! turns, riding in the next group commit. Confirms for one connection in one pass come as one
//! reply.
//!
//! # Drains and prekey fetches
//! Before serving a [`CoreRequest::Drain`] or [`CoreRequest::FetchPrekeys`] the core takes in
//! every request already queued on every shard's queue (so a store or prekey upload queued
//! before the read is seen), then answers from the store merged with the still-pending
//! operations of that user (pending inserts and bundles included, pending deletes excluded).
//! Reads therefore never write, and drains do not defeat ack cancellation.
//!
//! # resume_after (protocol v2)
//! A [`CoreRequest::Delivered`] (a v2 session ended) replaces its user's list of written ids
//! ([`crate::resume::ResumeLists`]); a session's first [`CoreRequest::Drain`] with a non-zero
//! `resume_after` takes that list and acks what it acknowledges (as [`CoreRequest::Ack`]s,
//! counted in `resume_acked`) before the drain is served, after the take-in pass that serves
//! every read, so a list queued on another shard before the drain is seen.
//!
//! # Acks of messages not stored
//! An ack of a message that is neither pending nor stored (never delivered, or already deleted)
//! costs one point lookup and writes nothing (`acks_not_stored`); it is still remembered in the
//! recent-acks set. The lookup is skipped for the messages the core committed in the last one to
//! two seconds: each successful commit records its messages (id, hash of the recipient, payload
//! bytes) in a memory that rotates with the recent-acks set, at most `RECENT_STORES_MAX` per
//! period. Under load, when acks arrive after the commit window, most acks are of such messages,
//! and the lookup in the store's memtable was the largest part of their cost. An entry is taken out
//! by the ack that uses it, and by the expiry of its message, so a message's place under the quota
//! is released once. A delete of a stored message rides in the next group commit with its fsync
//! (PROTOCOL.md: an acked message is never delivered again, so it is not left to chance).
//!
//! # Quota and expiry
//! Each recipient may have at most `max_messages_per_user` messages and `max_bytes_per_user`
//! payload bytes stored or pending; a store beyond that is not kept and its sender's shard gets
//! [`CoreReply::Refused`] (`recipient_inbox_full`). The counts live in a bounded map filled
//! lazily from the store (one prefix walk per recipient) and kept current on every store, ack,
//! expiry and failed commit, so no send scans the store. Messages older than
//! `message_ttl_secs` (the id carries the accept time: [`min_live_id`]) are never drained; a
//! drain's first chunk deletes up to one chunk of them, and a sweep walks every inbox in bounded
//! turns ([`MessageStore::sweep_expired`]) between requests, its deletes riding in the next
//! group commit.
//!
//! # Failures
//! A failed commit (disk full, I/O error) is logged once and counted (`store_errors`,
//! `failed_messages`). It fails only its own messages: their senders get
//! [`CoreReply::Refused`] (`store_unavailable`) and nothing of them stays in memory; the
//! batch's deletes and prekey bundles stay pending and are retried with backoff (10 ms doubling
//! to 1 s). fjall refuses every write after a failed journal write (`Poisoned`), so the core
//! closes and reopens the store before the next attempt (see `Core::ensure_open` for why that is
//! safe); drains, prekey reads and the shards' live delivery go on meanwhile, and commits work
//! again by themselves once space returns. While commits fail and more than
//! `queue_capacity × shards` operations are pending, the core stops taking new requests so the
//! shards' queues fill and the edge sheds load instead of the core growing memory.
//!
//! # Shutdown
//! The thread ends when [`EmbeddedCore::stop`] is called (or [`EmbeddedCore::shutdown`], or the
//! [`EmbeddedCore`] is dropped), or when every request sender of every shard is dropped. Either
//! way it first takes in everything still queued, answers the drains among it, commits all
//! pending operations durably (retrying a failed commit a few times, ~1.5 s in all), then
//! exits; if the final commit still fails, shutdown returns the error (and logs how many
//! operations were lost).
//!
//! # Hashing
//! The thread's maps (pending operations, recent acks and stores, the hot tier's indexes) hash
//! with foldhash, seeded per process, instead of the standard library's SipHash, which took about
//! a tenth of this thread under load. Their keys (user names, message ids) come from clients;
//! foldhash's random seed keeps collisions from being chosen in advance.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Select, Sender, TryRecvError, TrySendError};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use tracing::{debug, error, info, trace, warn};

use crate::api::{
    min_live_id, Confirm, Confirmed, ConnId, CoreReply, CoreRequest, DrainedMsg, ShardBell,
    ShardLink, StoredMsg, REFUSED_INBOX_FULL, REFUSED_STORE_FAILED, RESUME_IDS_MAX,
};
use crate::error::CoreError;
use crate::hotlog::{self, HotLog};
use crate::resume::{ResumeLists, RESUME_USERS_MAX};
use crate::store::{
    Batch, MessageStore, SentRecord, SweepSchedule, Usage, MAX_SENDER_LEN, MAX_USER_LEN,
    SWEEP_BUDGET, SWEEP_TURN,
};

/// How often the recent-acks set rotates; an ack is remembered for one to two periods. The
/// memory of recently committed messages rotates with it.
const ACK_MEMORY_PERIOD: Duration = Duration::from_secs(1);
/// Most messages one generation of the recently-committed memory holds (about 32 bytes each);
/// past it, acks of the messages committed later in that period fall back to a lookup.
const RECENT_STORES_MAX: usize = 131_072;
/// Requests taken from one shard's queue before looking at the next one (fairness).
const SWEEP_BATCH: usize = 1024;
/// Longest idle wait when nothing is due (the loop also wakes on every request).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long the core thread is idle before [`EmbeddedConfig::idle_hook`] runs.
pub use crate::idle::IDLE_HOOK_AFTER;
/// First retry delay after a failed commit; doubles per failure up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Bounded passes over the queues at shutdown (producers may still be sending).
const FINAL_PASSES: usize = 16;
/// Attempts of the final commit at shutdown (with the usual backoff: ~1.5 s in all).
const FINAL_COMMIT_ATTEMPTS: u32 = 8;

/// How far ahead of the highest id seen the persisted id floor is set, in id clock ticks (16 µs
/// each): one second. A commit writes the floor only when an id passed the last one written, so
/// a window whose messages were all acked inside it (nothing to store) needs no write and no
/// sync, instead of one per window for the floor alone. Shards seed their generators above the
/// floor, so ids minted after a restart within a second of the crash run up to this far ahead
/// of the clock, never below an id minted before.
const FLOOR_LEASE_TICKS: u64 = 1_000_000 / iris_bus::hops::ID_TICK_MICROS;

/// The id floor the embedded core persists once an id passed the last one: `max_id` plus one
/// second of id clock (the store's [`MessageStore::id_floor`] is at least every id accepted).
pub fn leased_floor(max_id: u64) -> u64 {
    use iris_bus::hops::ID_LOW_BITS;
    let tick = (max_id >> ID_LOW_BITS).saturating_add(FLOOR_LEASE_TICKS);
    tick.checked_shl(ID_LOW_BITS)
        .filter(|v| v >> ID_LOW_BITS == tick)
        .unwrap_or(u64::MAX)
        .max(max_id)
}

/// The hot log's directory, inside the store's.
const HOT_DIR: &str = "hot";
/// A failed move of hot messages into the LSM is tried again after this.
const HOT_RETRY: Duration = Duration::from_secs(1);

static LOGGED_HOT_FAILURE: AtomicBool = AtomicBool::new(false);
static LOGGED_QUOTA: AtomicBool = AtomicBool::new(false);
static LOGGED_COMMIT_FAILURE: AtomicBool = AtomicBool::new(false);
static LOGGED_RECOVERY: AtomicBool = AtomicBool::new(false);
static LOGGED_EXPIRY: AtomicBool = AtomicBool::new(false);
static RESUME_EVICTION_LOGGED: AtomicBool = AtomicBool::new(false);

/// True the first time it is called for `flag` (a limit hit is logged once, then counted).
fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

/// Configuration of the embedded core.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Directory of the fjall database (created if missing). Default `data/core`.
    pub data_dir: PathBuf,
    /// Group-commit window in milliseconds: the longest a stored message lives only in memory.
    /// Default 2. 0 commits on every pass of the core loop.
    pub commit_window_ms: u64,
    /// Capacity of each shard's request queue and of each shard's reply queue. Default 65536.
    pub queue_capacity: usize,
    /// Most messages in one [`CoreReply::Drain`]: a drain's `limit` is capped to it, and a
    /// `limit` of 0 means this many. Bounds the time one drain holds the core. Default 1024.
    pub drain_chunk: usize,
    /// Payload bytes per drain reply, at most (one message always fits); default 1 MiB. With
    /// `drain_chunk` it bounds what one reply adds to a connection's output queue.
    pub drain_chunk_bytes: usize,
    /// Most messages stored for one recipient; a message beyond it is refused
    /// ([`CoreReply::Refused`] `recipient_inbox_full`) and not stored. 0 = no limit. Default
    /// 100000.
    pub max_messages_per_user: u64,
    /// Most payload bytes stored for one recipient, as `max_messages_per_user`. 0 = no limit.
    /// Default 268435456 (256 MiB).
    pub max_bytes_per_user: u64,
    /// A stored message older than this (its id carries its accept time) is never drained and
    /// is deleted (lazily at a login drain, and by the background sweep). 0 = messages never
    /// expire. Default 2592000 (30 days).
    pub message_ttl_secs: u64,
    /// Recipients whose stored count the quota keeps in memory; when full, about half are
    /// forgotten (and counted again from the store when they next receive). Default 262144.
    pub usage_cache_users: usize,
    /// How long the dedup record of a v2 send (`(sender, client message id) -> id`) is kept:
    /// a resend within this time (after a reconnect, even after a crash) is acknowledged with
    /// the first id and not stored again; later it is a new message. Records older than this
    /// (the id carries its mint time) are deleted by a bounded background sweep. 0 = kept
    /// forever. Default 86400 (24 h).
    pub dedup_ttl_secs: u64,
    /// Called on the core thread once it has been idle for [`IDLE_HOOK_AFTER`] (nothing taken
    /// in, nothing pending), once per idle period. The edge passes its allocator's collection,
    /// so that the memory a burst freed on this thread goes back to the OS (the core thread
    /// frees what the store's batches and the shards' requests held). Default none.
    pub idle_hook: Option<fn()>,
    /// The hot tier's period in seconds ([`crate::hotlog`]): a message not acked within the
    /// commit window is written to the hot log (one append, synced at the commit) and kept in
    /// memory; one acked within one to two periods never reaches the LSM. 0 writes every
    /// message to the LSM at its commit. Default 1.
    pub hot_log_secs: u64,
    /// Most memory the hot tier's messages may hold (names, payloads and about 160 bytes of
    /// index each); over it, new messages go to the LSM directly. Default 67108864 (64 MiB).
    pub hot_log_max_bytes: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/core"),
            commit_window_ms: 2,
            queue_capacity: 65_536,
            drain_chunk: 1024,
            drain_chunk_bytes: 1 << 20,
            max_messages_per_user: 100_000,
            max_bytes_per_user: 256 << 20,
            message_ttl_secs: 30 * 24 * 3600,
            usage_cache_users: 262_144,
            dedup_ttl_secs: 24 * 3600,
            idle_hook: None,
            hot_log_secs: 1,
            hot_log_max_bytes: 64 << 20,
        }
    }
}

/// Live counters of the core thread (monotonic unless noted), readable from any thread.
#[derive(Debug, Default)]
pub struct CoreMetrics {
    /// Messages written to the store.
    pub stored: AtomicU64,
    /// Ack requests taken in.
    pub acked: AtomicU64,
    /// Messages acked inside the commit window, so never written.
    pub cancelled_before_store: AtomicU64,
    /// Stores that arrived after their own ack and were dropped.
    pub late_stores_dropped: AtomicU64,
    /// Successful group commits (each one batch + fsync).
    pub commits: AtomicU64,
    /// Total wall time of successful commits, microseconds (batch write + fsync).
    pub commit_micros_total: AtomicU64,
    /// Drain requests answered.
    pub drains: AtomicU64,
    /// Messages sent in drain replies.
    pub drained_messages: AtomicU64,
    /// Failed store operations (commits, scans, prekey reads).
    pub store_errors: AtomicU64,
    /// Requests the store cannot represent (user or sender too long); answered empty if a
    /// reply is due, otherwise dropped.
    pub invalid_requests: AtomicU64,
    /// Corrupt inbox entries skipped by drains.
    pub corrupt_skipped: AtomicU64,
    /// Replies that found their shard's reply queue full and waited in the overflow list.
    pub replies_deferred: AtomicU64,
    /// Gauge: operations (inserts, deletes, prekey bundles) waiting for the next commit.
    pub pending_ops: AtomicU64,
    /// Messages refused because their recipient was at `max_messages_per_user` or
    /// `max_bytes_per_user` (never stored; the sender got `0xFE recipient_inbox_full`).
    pub refused_over_quota: AtomicU64,
    /// Messages not stored because their commit failed (disk full, I/O error); the sender got
    /// `0xFE store_unavailable`.
    pub failed_messages: AtomicU64,
    /// Times the store was closed and opened again after a failed write.
    pub store_reopens: AtomicU64,
    /// Expired messages (older than `message_ttl_secs`) deleted.
    pub expired_deleted: AtomicU64,
    /// Acks of ids that were not stored: answered by a lookup, nothing written.
    pub acks_not_stored: AtomicU64,
    /// Acks of messages committed in the last one to two seconds: deleted without a lookup.
    pub acks_of_recent_stores: AtomicU64,
    /// Messages written to the hot log instead of the LSM at their commit.
    pub hot_logged: AtomicU64,
    /// Acks of messages in the hot tier: deleted with a hot log record, the LSM untouched.
    pub acks_of_hot: AtomicU64,
    /// Hot messages not acked within one to two periods, moved into the LSM.
    pub hot_moved: AtomicU64,
    /// v2 sends whose `(sender, client message id)` was seen before: answered
    /// [`Confirmed::Duplicate`], not stored.
    pub duplicate_sends: AtomicU64,
    /// Dedup records older than `dedup_ttl_secs` deleted.
    pub dedup_expired: AtomicU64,
    /// Stored messages acked by a v2 HELLO's `resume_after` (see [`CoreRequest::Drain`]).
    pub resume_acked: AtomicU64,
    /// Users whose delivered-ids list ([`CoreRequest::Delivered`]) was forgotten because more
    /// than [`RESUME_USERS_MAX`] users had one.
    pub resume_lists_evicted: AtomicU64,
}

/// A point-in-time copy of [`CoreMetrics`] (same fields, same meaning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub stored: u64,
    pub acked: u64,
    pub cancelled_before_store: u64,
    pub late_stores_dropped: u64,
    pub commits: u64,
    pub commit_micros_total: u64,
    pub drains: u64,
    pub drained_messages: u64,
    pub store_errors: u64,
    pub invalid_requests: u64,
    pub corrupt_skipped: u64,
    pub replies_deferred: u64,
    pub pending_ops: u64,
    pub refused_over_quota: u64,
    pub failed_messages: u64,
    pub store_reopens: u64,
    pub expired_deleted: u64,
    pub acks_not_stored: u64,
    pub acks_of_recent_stores: u64,
    pub hot_logged: u64,
    pub acks_of_hot: u64,
    pub hot_moved: u64,
    pub duplicate_sends: u64,
    pub dedup_expired: u64,
    pub resume_acked: u64,
    pub resume_lists_evicted: u64,
}

impl CoreMetrics {
    /// Reads every counter (each individually; not one atomic snapshot).
    pub fn snapshot(&self) -> CoreStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoreStats {
            stored: r(&self.stored),
            acked: r(&self.acked),
            cancelled_before_store: r(&self.cancelled_before_store),
            late_stores_dropped: r(&self.late_stores_dropped),
            commits: r(&self.commits),
            commit_micros_total: r(&self.commit_micros_total),
            drains: r(&self.drains),
            drained_messages: r(&self.drained_messages),
            store_errors: r(&self.store_errors),
            invalid_requests: r(&self.invalid_requests),
            corrupt_skipped: r(&self.corrupt_skipped),
            replies_deferred: r(&self.replies_deferred),
            pending_ops: r(&self.pending_ops),
            refused_over_quota: r(&self.refused_over_quota),
            failed_messages: r(&self.failed_messages),
            store_reopens: r(&self.store_reopens),
            expired_deleted: r(&self.expired_deleted),
            acks_not_stored: r(&self.acks_not_stored),
            acks_of_recent_stores: r(&self.acks_of_recent_stores),
            hot_logged: r(&self.hot_logged),
            acks_of_hot: r(&self.acks_of_hot),
            hot_moved: r(&self.hot_moved),
            duplicate_sends: r(&self.duplicate_sends),
            dedup_expired: r(&self.dedup_expired),
            resume_acked: r(&self.resume_acked),
            resume_lists_evicted: r(&self.resume_lists_evicted),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Handle to the running core thread.
pub struct EmbeddedCore {
    thread: Option<JoinHandle<Result<(), CoreError>>>,
    stop_tx: Sender<()>,
    metrics: Arc<CoreMetrics>,
    id_floor: u64,
}

impl std::fmt::Debug for EmbeddedCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCore")
            .field("id_floor", &self.id_floor)
            .field(
                "running",
                &self.thread.as_ref().is_some_and(|t| !t.is_finished()),
            )
            .finish_non_exhaustive()
    }
}

impl EmbeddedCore {
    /// Opens the store in `cfg.data_dir` (recovering what was committed before), starts the
    /// core thread, and returns its handle and one [`ShardLink`] per shard (index = shard).
    pub fn start(
        cfg: EmbeddedConfig,
        nr_shards: usize,
    ) -> Result<(Self, Vec<ShardLink>), CoreError> {
        if nr_shards == 0 || cfg.queue_capacity == 0 || cfg.drain_chunk == 0 {
            return Err(CoreError::InvalidInput(format!(
                "embedded core needs shards, queue_capacity and drain_chunk > 0 \
                 (got {nr_shards}, {}, {})",
                cfg.queue_capacity, cfg.drain_chunk
            )));
        }
        let store = MessageStore::open(&cfg.data_dir)?.with_dedup_ttl_secs(cfg.dedup_ttl_secs);
        // The hot log's messages go into the LSM before anything is served, so the LSM is the
        // whole truth again (and the id floor counts them).
        let hot_dir = cfg.data_dir.join(HOT_DIR);
        let mut rec = hotlog::recover(&hot_dir)?;
        store.write(
            &Batch {
                inserts: &rec.msgs,
                sent: &rec.sent,
                id_hint: rec.floor,
                ..Batch::default()
            },
            true,
        )?;
        rec.remove_files()?;
        if !rec.msgs.is_empty() || rec.torn > 0 {
            info!(
                messages = rec.msgs.len(),
                torn_frames = rec.torn,
                "hot log replayed into the store"
            );
        }
        let hot = (cfg.hot_log_secs > 0).then(|| {
            HotLog::new(
                &hot_dir,
                &rec,
                Duration::from_secs(cfg.hot_log_secs),
                cfg.hot_log_max_bytes,
            )
        });
        let id_floor = store.id_floor();
        let metrics = Arc::new(CoreMetrics::default());
        let (stop_tx, stop_rx) = channel::bounded(1);
        let (wake_tx, wake_rx) = channel::bounded(1);

        let mut links = Vec::with_capacity(nr_shards);
        let mut shards = Vec::with_capacity(nr_shards);
        for _ in 0..nr_shards {
            let (req_tx, req_rx) = channel::bounded(cfg.queue_capacity);
            let (rep_tx, rep_rx) = channel::bounded(cfg.queue_capacity);
            let bell = Arc::new(ShardBell::default());
            links.push(ShardLink {
                to_core: req_tx,
                from_core: rep_rx,
                bell: Arc::clone(&bell),
                wake_core: Some(wake_tx.clone()),
                gate: std::sync::Arc::default(),
            });
            shards.push(Shard {
                rx: req_rx,
                tx: rep_tx,
                bell,
                overflow: VecDeque::new(),
                open: true,
            });
        }

        let now = Instant::now();
        let core = Core {
            store: Some(store),
            data_dir: cfg.data_dir.clone(),
            dedup_ttl_secs: cfg.dedup_ttl_secs,
            reopen_needed: false,
            max_messages_per_user: cfg.max_messages_per_user,
            max_bytes_per_user: cfg.max_bytes_per_user,
            ttl_secs: cfg.message_ttl_secs,
            usage: HashMap::new(),
            usage_cap: cfg.usage_cache_users.max(1),
            usage_evictions: 0,
            refusals: HashSet::new(),
            confirms: HashMap::new(),
            expiry: SweepSchedule::new(cfg.message_ttl_secs, now + SWEEP_TURN),
            pending_sent: HashMap::new(),
            pending_sent_expired: Vec::new(),
            sent_expiry: SweepSchedule::new(cfg.dedup_ttl_secs, now + SWEEP_TURN),
            window: Duration::from_millis(cfg.commit_window_ms),
            drain_chunk: cfg.drain_chunk,
            drain_chunk_bytes: cfg.drain_chunk_bytes.max(1),
            pending_cap: cfg.queue_capacity.saturating_mul(nr_shards),
            shards,
            stop_rx,
            wake_rx,
            metrics: Arc::clone(&metrics),
            pending: HashMap::new(),
            pending_prekeys: HashMap::new(),
            pending_ops: 0,
            max_id_seen: id_floor,
            deadline: None,
            insert_due: DueQueue::default(),
            insert_ids: HashSet::new(),
            last_commit: None,
            failures: 0,
            recent_acks: HashSet::new(),
            older_acks: HashSet::new(),
            recent_stores: HashMap::new(),
            older_stores: HashMap::new(),
            next_rotation: now + ACK_MEMORY_PERIOD,
            deferred: Vec::new(),
            resume: ResumeLists::default(),
            idle: crate::idle::IdleHook::new(cfg.idle_hook),
            hot,
            hot_deletes: Vec::new(),
            hot_floor: 0,
            hot_retry_at: now,
        };
        let thread = std::thread::Builder::new()
            .name("iris-core".into())
            .spawn(move || core.run())?;
        info!(
            shards = nr_shards,
            id_floor,
            commit_window_ms = cfg.commit_window_ms,
            data_dir = %cfg.data_dir.display(),
            "embedded core started"
        );
        Ok((
            Self {
                thread: Some(thread),
                stop_tx,
                metrics,
                id_floor,
            },
            links,
        ))
    }

    /// The highest message id the store had seen when the core started: shards seed their id
    /// generators above it.
    pub fn id_floor(&self) -> u64 {
        self.id_floor
    }

    /// The core's live counters.
    pub fn metrics(&self) -> Arc<CoreMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Asks the core thread to finish: it takes in what is queued, commits durably and exits.
    /// Returns at once; [`EmbeddedCore::shutdown`] waits for it.
    pub fn stop(&self) {
        // A full channel means a stop is already signalled; a closed one means the thread ended.
        let _ = self.stop_tx.try_send(());
    }

    /// True once the core thread has exited (after a stop, or when all request senders are gone).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the core thread (see [`EmbeddedCore::stop`]), waits until it has committed
    /// everything pending durably and exited, and returns the final counters. An error means
    /// the final commit failed (the operations it held are lost) or the thread panicked.
    pub fn shutdown(mut self) -> Result<CoreStats, CoreError> {
        self.stop();
        self.join()?;
        Ok(self.metrics.snapshot())
    }

    fn join(&mut self) -> Result<(), CoreError> {
        match self.thread.take() {
            None => Ok(()),
            Some(t) => t.join().map_err(|_| CoreError::ThreadPanicked)?,
        }
    }
}

impl Drop for EmbeddedCore {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            if let Err(e) = self.join() {
                error!(error = %e, "embedded core ended with an error");
            }
        }
    }
}

/// The core's side of one shard's link.
struct Shard {
    rx: Receiver<CoreRequest>,
    tx: Sender<CoreReply>,
    /// Rung after replies were queued on `tx`.
    bell: Arc<ShardBell>,
    /// Replies that found `tx` full, oldest first.
    overflow: VecDeque<CoreReply>,
    /// False once every sender of `rx` is gone.
    open: bool,
}

/// One user's operations waiting for the next commit.
#[derive(Default)]
struct UserPending {
    inserts: BTreeMap<u64, PendingMsg>,
    deletes: BTreeSet<u64>,
}

/// A message waiting for the next commit, with the connection that sent it (told if it is not
/// stored after all) and its client message id (v2).
struct PendingMsg {
    msg: StoredMsg,
    shard: usize,
    conn: ConnId,
    client: Option<u64>,
}

/// A dedup record waiting for the next commit: `(sender, client)` was first sent as `id`.
struct PendingSent {
    id: u64,
    /// Sends to confirm once the record (and its message) is durable: the first one
    /// ([`Confirmed::Stored`]) and resends ([`Confirmed::Duplicate`]). Empty once settled.
    waiting: Vec<Waiter>,
    /// The message no longer waits for the commit (acked before it was written, or its store
    /// came after its ack): its sends were confirmed, only the record remains to be written.
    settled: bool,
}

/// A send waiting for the commit of a [`PendingSent`].
struct Waiter {
    shard: usize,
    conn: ConnId,
    /// The id this send was given (told if the commit fails).
    id: u64,
    /// A resend of the record's first message.
    duplicate: bool,
}

/// A read request (drain or prekey fetch) waiting for its take-in pass.
struct ReadReq {
    shard: usize,
    user: Vec<u8>,
    conn: ConnId,
    kind: ReadKind,
}

enum ReadKind {
    Drain {
        after: u64,
        limit: usize,
        resume_after: u64,
    },
    Prekeys,
}

/// Deadlines of pending inserts with their ids, front first: a queue kept in non-decreasing
/// order of deadline.
#[derive(Default)]
struct DueQueue(VecDeque<(Instant, u64)>);

impl DueQueue {
    /// Adds `id`'s deadline. Stores come in nearly in order (each shard's in its accept order,
    /// shards interleaved), so this is a push at the back; an entry earlier than those before it
    /// pulls them forward to its own deadline (committing them sooner is always allowed), which
    /// keeps the front the earliest without a heap.
    fn push(&mut self, due: Instant, id: u64) {
        for entry in self.0.iter_mut().rev() {
            if entry.0 <= due {
                break;
            }
            entry.0 = due;
        }
        self.0.push_back((due, id));
    }

    fn front(&self) -> Option<&(Instant, u64)> {
        self.0.front()
    }

    fn pop_front(&mut self) {
        self.0.pop_front();
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// State of the core thread.
struct Core {
    /// The store; `None` only between closing it after a failed write and a successful reopen.
    store: Option<MessageStore>,
    data_dir: PathBuf,
    /// Sizes the store's dedup buckets (see [`MessageStore::with_dedup_ttl_secs`]).
    dedup_ttl_secs: u64,
    /// A write failed: close and open the store before the next one (see [`Core::ensure_open`]).
    reopen_needed: bool,
    /// Quota per recipient (0 = none) and message lifetime (0 = forever).
    max_messages_per_user: u64,
    max_bytes_per_user: u64,
    ttl_secs: u64,
    /// Stored + pending messages per recipient, for the quota: filled lazily from the store
    /// (one prefix walk per recipient), kept up to date on every insert, ack and expiry,
    /// bounded by `usage_cache_users`.
    usage: HashMap<Vec<u8>, Usage>,
    /// Most entries of `usage`.
    usage_cap: usize,
    /// Times `usage` was thinned (salts the choice of what is forgotten).
    usage_evictions: u64,
    /// `(shard, conn, reason)` to tell with [`CoreReply::Refused`] at the end of this pass.
    refusals: HashSet<(usize, ConnId, &'static str)>,
    /// Confirms to send with [`CoreReply::Confirms`] at the end of this pass, per connection,
    /// in the order they were settled.
    confirms: HashMap<(usize, ConnId), Vec<Confirm>>,
    /// Dedup records waiting for the next commit, by `(sender, client)`.
    pending_sent: HashMap<(Vec<u8>, u64), PendingSent>,
    /// Expired dedup records to delete at the next commit.
    pending_sent_expired: Vec<SentRecord>,
    /// The dedup records' expiry sweep.
    sent_expiry: SweepSchedule,
    /// The messages' expiry sweep.
    expiry: SweepSchedule,
    window: Duration,
    drain_chunk: usize,
    drain_chunk_bytes: usize,
    /// Above this many pending operations, and while commits fail, stop taking requests.
    pending_cap: usize,
    shards: Vec<Shard>,
    stop_rx: Receiver<()>,
    /// Rung by shards for requests that need a prompt answer (see [`Core::wait`]).
    wake_rx: Receiver<()>,
    metrics: Arc<CoreMetrics>,
    /// Per recipient: pending inserts and deletes.
    pending: HashMap<Vec<u8>, UserPending>,
    pending_prekeys: HashMap<Vec<u8>, Vec<u8>>,
    /// Inserts + deletes in `pending` + bundles in `pending_prekeys` + records in
    /// `pending_sent` and `pending_sent_expired`.
    pending_ops: usize,
    /// Highest id of any store taken in (persisted as the id floor at the next commit).
    max_id_seen: u64,
    /// When the next commit is due for what is pending besides new messages (deletes, bundles,
    /// dedup records of acked messages, the id floor) or for a retry; None when none of that
    /// is pending. New messages have their own deadlines ([`Core::insert_due`]).
    deadline: Option<Instant>,
    /// Each pending insert's deadline (`accepted + window`) and id, in the order taken in and
    /// kept non-decreasing (see [`DueQueue::push`]), so the front is the earliest. An insert
    /// cancelled by its ack leaves its entry here; it is skipped when it comes to the front.
    insert_due: DueQueue,
    /// Ids of the pending inserts (not yet written, not cancelled).
    insert_ids: HashSet<u64>,
    /// When the last commit that had something to write ended: no new message's deadline falls
    /// before `window` after it (see [`Core::next_due`]).
    last_commit: Option<Instant>,
    /// Consecutive failed commits.
    failures: u32,
    /// Acks of messages that were not pending, `(id, hash(user))`: this and the previous period.
    recent_acks: HashSet<(u64, u64)>,
    older_acks: HashSet<(u64, u64)>,
    /// Messages committed in this and the previous period: id -> (hash(recipient), payload
    /// bytes). Their ack needs no lookup to know they are stored (see [`Core::on_ack`]).
    recent_stores: HashMap<u64, (u64, u64)>,
    older_stores: HashMap<u64, (u64, u64)>,
    next_rotation: Instant,
    /// Reads (drains, prekey fetches) taken in but not yet served: each waits for one take-in
    /// pass over all queues that starts after it was received.
    deferred: Vec<ReadReq>,
    /// The ids written to each user's last v2 session, for `resume_after`.
    resume: ResumeLists,
    /// See [`EmbeddedConfig::idle_hook`].
    idle: crate::idle::IdleHook,
    /// The hot tier ([`crate::hotlog`]); None if `hot_log_secs` is 0.
    hot: Option<HotLog>,
    /// Hot messages acked since the last commit: their deletes go into its hot log frame.
    hot_deletes: Vec<(Vec<u8>, u64)>,
    /// The highest id floor a hot log frame made durable.
    hot_floor: u64,
    /// No move of hot messages into the LSM before this (after a failed one).
    hot_retry_at: Instant,
}

impl Core {
    fn run(mut self) -> Result<(), CoreError> {
        loop {
            let mut took = 0;
            if !self.stalled() {
                for s in 0..self.shards.len() {
                    took += self.take_from(s, SWEEP_BATCH);
                }
            }
            if !self.deferred.is_empty() {
                self.serve_reads();
            }
            self.flush_overflows();
            let now = Instant::now();
            if self.next_due().is_some_and(|d| now >= d) {
                // A failure is logged, counted and retried by `commit` itself.
                let _ = self.commit();
            }
            self.move_hot(now);
            self.sweep(now);
            self.sweep_sent(now);
            self.flush_answers();
            self.rotate_acks(now);
            self.metrics
                .pending_ops
                .store(self.pending_ops as u64, Ordering::Relaxed);

            match self.stop_rx.try_recv() {
                Ok(()) | Err(TryRecvError::Disconnected) => {
                    debug!("embedded core stop requested");
                    break;
                }
                Err(TryRecvError::Empty) => {}
            }
            if self.shards.iter().all(|s| !s.open) {
                debug!("all shard links closed");
                break;
            }
            let due = self.next_due();
            self.idle
                .note(took > 0 || !self.deferred.is_empty() || due.is_some(), now);
            if took == 0 && self.deferred.is_empty() {
                self.wait(due);
            }
        }
        self.finish()
    }

    /// While commits fail and too much is pending, requests stay in the queues (backpressure).
    fn stalled(&self) -> bool {
        self.failures > 0 && self.pending_ops >= self.pending_cap
    }

    /// Blocks until a request or stop signal arrives, an overflowing reply queue has room, or
    /// the next commit is due (`due`, from [`Core::next_due`]).
    ///
    /// With a commit pending, requests do not wake the core: stores and acks wait in the
    /// queues until the commit window closes and are taken in as one batch (one wake-up per
    /// window instead of one per message). A shard rings `wake_rx` for a request that needs
    /// a prompt answer (a drain, a prekey fetch) or when its queue passes half full.
    fn wait(&mut self, due: Option<Instant>) {
        let now = Instant::now();
        let mut timeout = due.map_or(IDLE_WAIT, |d| {
            d.saturating_duration_since(now).min(IDLE_WAIT)
        });
        for next in [self.expiry.next_due(), self.sent_expiry.next_due()]
            .into_iter()
            .flatten()
        {
            timeout = timeout.min(next.saturating_duration_since(now));
        }
        if let Some(due) = self.hot.as_ref().and_then(HotLog::next_due) {
            let due = due.max(self.hot_retry_at);
            timeout = timeout.min(due.saturating_duration_since(now));
        }
        if timeout.is_zero() {
            return;
        }
        let stalled = self.stalled();
        let batching = due.is_some();
        let mut sel = Select::new();
        sel.recv(&self.stop_rx);
        sel.recv(&self.wake_rx);
        for s in &self.shards {
            if s.open && !stalled && !batching {
                sel.recv(&s.rx);
            }
            if !s.overflow.is_empty() {
                sel.send(&s.tx);
            }
        }
        // Which operation is ready does not matter: the loop sweeps everything.
        let _ = sel.ready_timeout(timeout);
        // A ring is consumed here; the loop then sweeps every queue.
        let _ = self.wake_rx.try_recv();
    }

    /// Takes in and handles up to `max` requests from shard `s`; returns how many.
    fn take_from(&mut self, s: usize, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(shard) = self.shards.get_mut(s) else {
                break;
            };
            if !shard.open {
                break;
            }
            match shard.rx.try_recv() {
                Ok(req) => {
                    n += 1;
                    self.handle(s, req);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    debug!(shard = s, "shard request queue closed");
                    shard.open = false;
                }
            }
        }
        if n > 0 {
            // A shard whose backlog waits for room in this queue sleeps until now.
            if let Some(shard) = self.shards.get(s) {
                shard.bell.room_made();
            }
        }
        n
    }

    /// One take-in pass: everything queued on every shard right now.
    fn take_in_all(&mut self) -> usize {
        let mut n = 0;
        for s in 0..self.shards.len() {
            let queued = self.shards[s].rx.len();
            n += self.take_from(s, queued);
        }
        n
    }

    fn handle(&mut self, shard: usize, req: CoreRequest) {
        match req {
            CoreRequest::Store {
                msg,
                conn,
                client,
                accepted,
            } => self.on_store(shard, conn, msg, client, accepted),
            CoreRequest::Ack { user, id } => self.on_ack(user, id),
            CoreRequest::Drain {
                user,
                conn,
                after,
                limit,
                resume_after,
            } => self.deferred.push(ReadReq {
                shard,
                user,
                conn,
                kind: ReadKind::Drain {
                    after,
                    limit,
                    resume_after,
                },
            }),
            CoreRequest::Delivered { user, ids } => {
                if self.invalid_user(&user, "delivered") {
                    return;
                }
                let mut ids = ids;
                // The last ones written, if a sender sent more than the bound.
                ids.drain(..ids.len().saturating_sub(RESUME_IDS_MAX));
                let evicted = self.resume.put(user, ids);
                if evicted > 0 {
                    bump(&self.metrics.resume_lists_evicted, evicted as u64);
                    if !RESUME_EVICTION_LOGGED.swap(true, Ordering::Relaxed) {
                        debug!(
                            max_users = RESUME_USERS_MAX,
                            "resume lists over their bound: the oldest are forgotten"
                        );
                    }
                }
            }
            CoreRequest::PutPrekeys { user, bundle } => {
                if self.invalid_user(&user, "prekeys") {
                    return;
                }
                if self.pending_prekeys.insert(user, bundle).is_none() {
                    self.pending_ops += 1;
                }
                self.arm_deadline();
            }
            CoreRequest::FetchPrekeys { user, conn } => self.deferred.push(ReadReq {
                shard,
                user,
                conn,
                kind: ReadKind::Prekeys,
            }),
            // One box: presence lives in the shards, and a relay or forward for a user not
            // connected here has nowhere else to go.
            CoreRequest::Online { .. }
            | CoreRequest::Offline { .. }
            | CoreRequest::Relay { .. }
            | CoreRequest::Forward { .. }
            | CoreRequest::ForwardRelay { .. } => {}
        }
    }

    fn on_store(
        &mut self,
        shard: usize,
        conn: ConnId,
        msg: StoredMsg,
        client: Option<u64>,
        accepted: Instant,
    ) {
        let invalid = if self.invalid_user(&msg.recipient, "store") {
            true
        } else if msg.sender.len() > MAX_SENDER_LEN {
            bump(&self.metrics.invalid_requests, 1);
            debug!(
                len = msg.sender.len(),
                "store with oversized sender dropped"
            );
            true
        } else {
            false
        };
        if invalid {
            if let Some(c) = client {
                // The store cannot write it: a v2 sender is told rather than left waiting.
                let refused = Confirmed::Refused(REFUSED_STORE_FAILED);
                self.confirm(shard, conn, c, msg.id, refused);
            }
            return;
        }
        self.max_id_seen = self.max_id_seen.max(msg.id);
        if let Some(c) = client {
            if self.answered_as_resend(shard, conn, &msg, c) {
                return;
            }
        }
        let key = (msg.id, user_hash(&msg.recipient));
        if self.recent_acks.contains(&key) || self.older_acks.contains(&key) {
            bump(&self.metrics.late_stores_dropped, 1);
            debug!(id = msg.id, "store after its ack dropped");
            if let Some(c) = client {
                // Delivered and acked: confirmed, and a resend must still be known.
                self.confirm(shard, conn, c, msg.id, Confirmed::Stored);
                self.settle_record(msg.sender, c, msg.id);
            }
            return;
        }
        if self
            .pending
            .get(&msg.recipient)
            .is_some_and(|p| p.inserts.contains_key(&msg.id))
            || self
                .hot
                .as_ref()
                .is_some_and(|h| h.contains(&msg.recipient, msg.id))
        {
            debug!(id = msg.id, "store of a message already pending ignored");
            return;
        }
        if !self.admit(&msg) {
            bump(&self.metrics.refused_over_quota, 1);
            if first_time(&LOGGED_QUOTA) {
                warn!(
                    max_messages_per_user = self.max_messages_per_user,
                    max_bytes_per_user = self.max_bytes_per_user,
                    "messages to a recipient over its quota are refused (logged once; \
                     iris_core_refused_over_quota_total counts them)"
                );
            }
            match client {
                Some(c) => self.confirm(
                    shard,
                    conn,
                    c,
                    msg.id,
                    Confirmed::Refused(REFUSED_INBOX_FULL),
                ),
                None => {
                    self.refusals.insert((shard, conn, REFUSED_INBOX_FULL));
                }
            }
            return;
        }
        trace!(id = msg.id, "store pending");
        // Look up before inserting so the recipient is cloned only for a new pending user.
        if !self.pending.contains_key(&msg.recipient) {
            self.pending
                .insert(msg.recipient.clone(), UserPending::default());
        }
        if let Some(c) = client {
            self.pending_sent.insert(
                (msg.sender.clone(), c),
                PendingSent {
                    id: msg.id,
                    waiting: vec![Waiter {
                        shard,
                        conn,
                        id: msg.id,
                        duplicate: false,
                    }],
                    settled: false,
                },
            );
            self.pending_ops += 1;
        }
        // An id above the durable floor needs the floor written (once per lease, see
        // `leased_floor`) by the window, acked or not.
        if msg.id > self.durable_floor() {
            self.arm_deadline();
        }
        if let Some(p) = self.pending.get_mut(&msg.recipient) {
            let id = msg.id;
            p.inserts.insert(
                id,
                PendingMsg {
                    msg,
                    shard,
                    conn,
                    client,
                },
            );
            self.pending_ops += 1;
            self.insert_ids.insert(id);
            self.insert_due.push(accepted + self.window, id);
        }
    }

    /// If `(msg.sender, client)` was seen before (pending or stored), answers this resend
    /// ([`Confirmed::Duplicate`] with the first id: now, or after the commit that makes the
    /// first durable) and returns true: it is not stored. Also true, with a refusal
    /// (`store_unavailable`), when the store cannot tell.
    fn answered_as_resend(
        &mut self,
        shard: usize,
        conn: ConnId,
        msg: &StoredMsg,
        client: u64,
    ) -> bool {
        let key = (msg.sender.clone(), client);
        if let Some(p) = self.pending_sent.get_mut(&key) {
            bump(&self.metrics.duplicate_sends, 1);
            trace!(id = p.id, client, "resend of a pending message");
            if p.settled {
                let id = p.id;
                self.confirm(shard, conn, client, id, Confirmed::Duplicate);
            } else {
                p.waiting.push(Waiter {
                    shard,
                    conn,
                    id: msg.id,
                    duplicate: true,
                });
            }
            return true;
        }
        if let Some(id) = self
            .hot
            .as_ref()
            .and_then(|h| h.sent_id(&msg.sender, client))
        {
            bump(&self.metrics.duplicate_sends, 1);
            trace!(id, client, "resend of a hot message");
            self.confirm(shard, conn, client, id, Confirmed::Duplicate);
            return true;
        }
        match self.store().and_then(|s| s.sent_id(&msg.sender, client)) {
            Ok(None) => false,
            Ok(Some(id)) => {
                bump(&self.metrics.duplicate_sends, 1);
                trace!(id, client, "resend of a stored message");
                self.confirm(shard, conn, client, id, Confirmed::Duplicate);
                true
            }
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, "dedup lookup failed: send refused");
                let refused = Confirmed::Refused(REFUSED_STORE_FAILED);
                self.confirm(shard, conn, client, msg.id, refused);
                true
            }
        }
    }

    /// Queues a confirm for the end of this pass.
    fn confirm(&mut self, shard: usize, conn: ConnId, client: u64, id: u64, outcome: Confirmed) {
        self.confirms
            .entry((shard, conn))
            .or_default()
            .push(Confirm {
                client,
                id,
                outcome,
            });
    }

    /// Keeps the dedup record `(sender, client) -> id` pending (written by the next commit)
    /// for a message that no longer waits for it; confirms the sends that waited for it.
    fn settle_record(&mut self, sender: Vec<u8>, client: u64, id: u64) {
        let waiting = match self.pending_sent.entry((sender, client)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let p = e.get_mut();
                p.settled = true;
                std::mem::take(&mut p.waiting)
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(PendingSent {
                    id,
                    waiting: Vec::new(),
                    settled: true,
                });
                self.pending_ops += 1;
                Vec::new()
            }
        };
        for w in waiting {
            let outcome = if w.duplicate {
                Confirmed::Duplicate
            } else {
                Confirmed::Stored
            };
            self.confirm(w.shard, w.conn, client, id, outcome);
        }
        self.arm_deadline();
    }

    fn quota_on(&self) -> bool {
        self.max_messages_per_user > 0 || self.max_bytes_per_user > 0
    }

    /// Charges `msg` to its recipient's quota; false (nothing charged) when it does not fit.
    fn admit(&mut self, msg: &StoredMsg) -> bool {
        if !self.quota_on() {
            return true;
        }
        let (max_msgs, max_bytes) = (self.max_messages_per_user, self.max_bytes_per_user);
        let len = msg.payload.len() as u64;
        let Some(u) = self.usage_of(&msg.recipient) else {
            return true; // the store could not count (counted as a store error): admit
        };
        if (max_msgs > 0 && u.messages >= max_msgs)
            || (max_bytes > 0 && u.payload_bytes.saturating_add(len) > max_bytes)
        {
            return false;
        }
        u.messages += 1;
        u.payload_bytes += len;
        true
    }

    /// The recipient's usage entry, counted from the store (plus what is pending) on first use.
    fn usage_of(&mut self, user: &[u8]) -> Option<&mut Usage> {
        if !self.usage.contains_key(user) {
            let mut u = match self.store().and_then(|s| s.usage(user)) {
                Ok(u) => u,
                Err(e) => {
                    bump(&self.metrics.store_errors, 1);
                    debug!(error = %e, "counting a recipient's stored messages failed");
                    return None;
                }
            };
            if let Some(h) = &self.hot {
                let (n, bytes) = h.usage(user);
                u.messages += n;
                u.payload_bytes += bytes;
            }
            if let Some(p) = self.pending.get(user) {
                for m in p.inserts.values() {
                    u.messages += 1;
                    u.payload_bytes += m.msg.payload.len() as u64;
                }
                // Pending deletes are of stored messages (acks and expiry look them up).
                for id in &p.deletes {
                    if let Ok(Some(len)) = self.store().and_then(|s| s.payload_len(user, *id)) {
                        u.messages = u.messages.saturating_sub(1);
                        u.payload_bytes = u.payload_bytes.saturating_sub(len);
                    }
                }
            }
            if self.usage.len() >= self.usage_cap {
                // Forget about half, picked by a hash salted anew each time (amortised O(1) per
                // insert); whatever survives is counted right, only the cost of recounting moves.
                self.usage_evictions = self.usage_evictions.wrapping_add(1);
                let salt = self.usage_evictions;
                self.usage.retain(|k, _| {
                    user_hash(k)
                        .wrapping_add(salt)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        >> 63
                        == 0
                });
                if self.usage.len() >= self.usage_cap {
                    self.usage.clear();
                }
            }
            self.usage.insert(user.to_vec(), u);
        }
        self.usage.get_mut(user)
    }

    /// A message of `user` with `bytes` of payload left the store (or will at the next commit).
    fn release(&mut self, user: &[u8], bytes: u64) {
        if let Some(u) = self.usage.get_mut(user) {
            u.messages = u.messages.saturating_sub(1);
            u.payload_bytes = u.payload_bytes.saturating_sub(bytes);
        }
    }

    /// Queues the delete of an expired stored message (once).
    fn queue_expired(&mut self, user: Vec<u8>, id: u64, bytes: u64) {
        // Its ack, should one still come, must not release its bytes a second time.
        let _ = self.take_recent_store(id, user_hash(&user));
        if self
            .pending
            .entry(user.clone())
            .or_default()
            .deletes
            .insert(id)
        {
            self.pending_ops += 1;
            self.release(&user, bytes);
            bump(&self.metrics.expired_deleted, 1);
            if first_time(&LOGGED_EXPIRY) {
                info!(
                    message_ttl_secs = self.ttl_secs,
                    "expired messages are deleted (logged once; \
                     iris_core_expired_deleted_total counts them)"
                );
            }
            self.arm_deadline();
        }
    }

    fn store(&self) -> Result<&MessageStore, CoreError> {
        self.store.as_ref().ok_or_else(|| {
            CoreError::Io(std::io::Error::other(
                "the store is closed after a failed write; it is reopened at the next commit",
            ))
        })
    }

    /// Opens the store again after a failed write. fjall "poisons" a database whose journal
    /// write or fsync failed and refuses every later write, so without this a full disk would
    /// stop the store for good. Reopening is safe: the old handle is dropped first (its worker
    /// threads end and the directory lock is released), and opening recovers exactly the
    /// journal batches that are complete on disk (a torn tail is truncated by checksum). Every
    /// batch this core reported as committed was fsynced before, so it is among them; the
    /// failed batch may or may not be (its senders were told it failed, so at worst a message
    /// whose sender was told `store_unavailable` is delivered anyway). Nothing else lives only
    /// in fjall's memory: the core writes nothing but durable batches.
    fn ensure_open(&mut self) -> Result<(), CoreError> {
        if self.store.is_some() && !self.reopen_needed {
            return Ok(());
        }
        self.store = None;
        let store = MessageStore::open(&self.data_dir)?.with_dedup_ttl_secs(self.dedup_ttl_secs);
        self.store = Some(store);
        self.reopen_needed = false;
        bump(&self.metrics.store_reopens, 1);
        debug!(dir = %self.data_dir.display(), "store reopened after a failed write");
        Ok(())
    }

    /// One bounded turn of the expiry sweep (see [`MessageStore::sweep_expired`]).
    fn sweep(&mut self, now: Instant) {
        if !self.expiry.is_due(now) {
            return;
        }
        if self.failures > 0 || self.pending_ops >= self.pending_cap / 2 {
            self.expiry.defer(now);
            return;
        }
        let (min_live, cursor) = self.expiry.start();
        let turn = self
            .store()
            .and_then(|s| s.sweep_expired(&cursor, min_live, SWEEP_BUDGET));
        let next = match turn {
            Ok(turn) => {
                for (user, id, bytes) in turn.expired {
                    self.queue_expired(user, id, bytes);
                }
                turn.next
            }
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, "expiry sweep failed");
                None
            }
        };
        self.expiry.done(now, next);
    }

    /// Sends the refusals of this pass, one per connection and reason, and its confirms, one
    /// reply per connection.
    fn flush_answers(&mut self) {
        if !self.refusals.is_empty() {
            for (shard, conn, reason) in std::mem::take(&mut self.refusals) {
                self.reply(shard, CoreReply::Refused { conn, reason });
            }
        }
        if !self.confirms.is_empty() {
            for ((shard, conn), confirms) in std::mem::take(&mut self.confirms) {
                self.reply(shard, CoreReply::Confirms { conn, confirms });
            }
        }
    }

    /// One bounded turn of the dedup records' expiry (see [`MessageStore::expired_sent`]).
    fn sweep_sent(&mut self, now: Instant) {
        if !self.sent_expiry.is_due(now) {
            return;
        }
        let busy = self.failures > 0 || self.pending_ops >= self.pending_cap / 2;
        // A new pass waits until the last one's deletes are committed (it would find them).
        if busy || (!self.sent_expiry.mid_pass() && !self.pending_sent_expired.is_empty()) {
            self.sent_expiry.defer(now);
            return;
        }
        let (min_live, cursor) = self.sent_expiry.start();
        if cursor.is_empty() {
            // A new pass: whole buckets first, then the records of older builds.
            match self.store().and_then(|s| s.drop_expired_sent(min_live)) {
                Ok(n) => bump(&self.metrics.dedup_expired, n),
                Err(e) => {
                    bump(&self.metrics.store_errors, 1);
                    debug!(error = %e, "dedup bucket expiry failed");
                }
            }
        }
        let next = match self
            .store()
            .and_then(|s| s.expired_sent(&cursor, min_live, SWEEP_BUDGET))
        {
            Ok((expired, next)) => {
                if !expired.is_empty() {
                    trace!(n = expired.len(), "expired dedup records");
                    self.pending_ops += expired.len();
                    self.pending_sent_expired.extend(expired);
                    self.arm_deadline();
                }
                next
            }
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, "dedup expiry sweep failed");
                None
            }
        };
        self.sent_expiry.done(now, next);
    }

    fn on_ack(&mut self, user: Vec<u8>, id: u64) {
        bump(&self.metrics.acked, 1);
        if self.invalid_user(&user, "ack") {
            return;
        }
        if let Some(p) = self.pending.get_mut(&user) {
            if let Some(m) = p.inserts.remove(&id) {
                self.pending_ops -= 1;
                self.insert_ids.remove(&id);
                if p.inserts.is_empty() && p.deletes.is_empty() {
                    self.pending.remove(&user);
                }
                self.release(&user, m.msg.payload.len() as u64);
                bump(&self.metrics.cancelled_before_store, 1);
                trace!(id, "ack cancelled a pending store");
                if let Some(c) = m.client {
                    self.settle_record(m.msg.sender, c, id);
                }
                return;
            }
            if p.deletes.contains(&id) {
                return; // already to be deleted
            }
        }
        if let Some(m) = self.hot.as_mut().and_then(|h| h.take(&user, id)) {
            // In the hot log only: its delete is one record there at the next commit.
            bump(&self.metrics.acks_of_hot, 1);
            trace!(id, "ack of a hot message");
            self.release(&user, m.payload.len() as u64);
            self.hot_deletes.push((user, id));
            self.pending_ops += 1;
            self.arm_deadline();
            return;
        }
        let hash = user_hash(&user);
        self.recent_acks.insert((id, hash));
        // Only a stored message needs a tombstone. One committed in the last second or two is
        // known without a lookup (under load most acks that miss the window are such).
        if let Some(bytes) = self.take_recent_store(id, hash) {
            bump(&self.metrics.acks_of_recent_stores, 1);
            self.release(&user, bytes);
            if self.pending.entry(user).or_default().deletes.insert(id) {
                self.pending_ops += 1;
            }
            self.arm_deadline();
            return;
        }
        // Otherwise a point lookup first. (A store still queued on another shard's queue is
        // dropped when it comes, by `recent_acks`.)
        match self.store().and_then(|s| s.payload_len(&user, id)) {
            Ok(None) => {
                bump(&self.metrics.acks_not_stored, 1);
                trace!(id, "ack of a message not stored: nothing to write");
                return;
            }
            Ok(Some(bytes)) => self.release(&user, bytes),
            Err(e) => {
                // Cannot tell: delete it (deleting an absent message is harmless).
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, "ack lookup failed");
            }
        }
        if self.pending.entry(user).or_default().deletes.insert(id) {
            self.pending_ops += 1;
        }
        self.arm_deadline();
    }

    fn invalid_user(&self, user: &[u8], what: &'static str) -> bool {
        if user.len() > MAX_USER_LEN {
            bump(&self.metrics.invalid_requests, 1);
            debug!(
                request = what,
                len = user.len(),
                "request with oversized user name"
            );
            true
        } else {
            false
        }
    }

    /// Removes `id` from the memory of recently committed messages and returns its payload
    /// bytes, if it is there for the recipient hashed `hash`.
    fn take_recent_store(&mut self, id: u64, hash: u64) -> Option<u64> {
        for gen in [&mut self.recent_stores, &mut self.older_stores] {
            if let Some(&(h, bytes)) = gen.get(&id) {
                if h == hash {
                    gen.remove(&id);
                    return Some(bytes);
                }
            }
        }
        None
    }

    fn arm_deadline(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.window);
        }
    }

    /// When the next commit is due, if anything is pending: the earlier of [`Core::deadline`]
    /// and the deadline of the oldest insert still pending. A new message is due `window` after
    /// the edge accepted it, so one acked within its own window is never written, whenever the
    /// other messages came; and never sooner than `window` after the last commit ended (as
    /// when the window counted from the first store taken in after it), so stores taken in
    /// late (a backlog, or those that came during a commit's fsync) do not make commits more
    /// frequent. Drops the entries of cancelled inserts from the front of [`Core::insert_due`].
    fn next_due(&mut self) -> Option<Instant> {
        while let Some(&(due, id)) = self.insert_due.front() {
            if self.insert_ids.contains(&id) {
                let due = self.last_commit.map_or(due, |c| due.max(c + self.window));
                return Some(self.deadline.map_or(due, |d| d.min(due)));
            }
            self.insert_due.pop_front();
        }
        self.deadline
    }

    /// The id floor already durable (in the LSM or a hot log frame).
    fn durable_floor(&self) -> u64 {
        self.store
            .as_ref()
            .map_or(0, MessageStore::id_floor)
            .max(self.hot_floor)
    }

    fn rotate_acks(&mut self, now: Instant) {
        if now < self.next_rotation {
            return;
        }
        if now >= self.next_rotation + ACK_MEMORY_PERIOD {
            // Idle for more than a whole period: both generations are stale.
            self.older_acks.clear();
            self.recent_acks.clear();
            // Dropped, not cleared: a burst's capacity (up to a few MB) is not kept while idle.
            self.older_stores = HashMap::new();
            self.recent_stores = HashMap::new();
        } else {
            self.older_acks = std::mem::take(&mut self.recent_acks);
            self.older_stores = std::mem::take(&mut self.recent_stores);
        }
        self.next_rotation = now + ACK_MEMORY_PERIOD;
    }

    /// Serves the reads received before this call, after one take-in pass over all queues
    /// (reads received during the pass wait for the next call). So a write queued on any shard
    /// before a read was queued is visible to that read.
    fn serve_reads(&mut self) {
        let ready = std::mem::take(&mut self.deferred);
        self.take_in_all();
        for r in ready {
            self.serve_read(r);
        }
    }

    fn serve_read(&mut self, r: ReadReq) {
        let ReadReq {
            shard,
            user,
            conn,
            kind,
        } = r;
        match kind {
            ReadKind::Drain {
                after,
                limit,
                resume_after,
            } => {
                // A session's first drain: what its HELLO's resume_after acknowledges goes as
                // acks first (taken in before the drain: pending deletes are never drained).
                if resume_after > 0 {
                    let ids = self.resume.take(&user, resume_after);
                    bump(&self.metrics.resume_acked, ids.len() as u64);
                    for id in ids {
                        self.on_ack(user.clone(), id);
                    }
                }
                self.serve_drain(shard, user, conn, after, limit)
            }
            ReadKind::Prekeys => {
                let bundle = self.prekeys_of(&user);
                self.reply(shard, CoreReply::Prekeys { conn, user, bundle });
            }
        }
    }

    fn prekeys_of(&mut self, user: &[u8]) -> Option<Vec<u8>> {
        if self.invalid_user(user, "fetch prekeys") {
            return None;
        }
        if let Some(b) = self.pending_prekeys.get(user) {
            return Some(b.clone());
        }
        match self.store().and_then(|s| s.get_prekeys(user)) {
            Ok(b) => b,
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                error!(error = %e, "prekey read failed");
                None
            }
        }
    }

    fn serve_drain(&mut self, shard: usize, user: Vec<u8>, conn: ConnId, after: u64, limit: usize) {
        let limit = if limit == 0 {
            self.drain_chunk
        } else {
            limit.min(self.drain_chunk)
        };
        let (mut msgs, complete) = if self.invalid_user(&user, "drain") {
            (Vec::new(), true)
        } else {
            let min_live = min_live_id(iris_bus::hops::unix_micros(), self.ttl_secs);
            if after < min_live {
                // Expired messages are never drained; the first chunk of a drain deletes (some
                // of) them at once, the sweep the rest.
                if after == 0 {
                    self.expire_now(&user, min_live);
                }
                self.drain_msgs(&user, min_live - 1, limit)
            } else {
                self.drain_msgs(&user, after, limit)
            }
        };
        let mut more = msgs.len() == limit;
        let mut bytes = 0usize;
        if let Some(cut) = msgs.iter().position(|m| {
            bytes += m.payload.len();
            bytes > self.drain_chunk_bytes
        }) {
            // Keep at least one message so a drain always progresses.
            msgs.truncate(cut.max(1));
            more = true;
        }
        bump(&self.metrics.drains, 1);
        bump(&self.metrics.drained_messages, msgs.len() as u64);
        debug!(shard, conn, after, n = msgs.len(), more, "drain served");
        self.reply(
            shard,
            CoreReply::Drain {
                conn,
                user,
                msgs,
                more,
                complete,
            },
        );
    }

    /// Queues the delete of up to one drain chunk of `user`'s expired messages.
    fn expire_now(&mut self, user: &[u8], min_live: u64) {
        match self
            .store()
            .and_then(|s| s.expired(user, min_live, self.drain_chunk))
        {
            Ok(v) => {
                for (id, bytes) in v {
                    self.queue_expired(user.to_vec(), id, bytes);
                }
            }
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, "expired scan failed");
            }
        }
    }

    /// Up to `limit` of `user`'s messages after `after`: the store merged with what is pending;
    /// false with them when the store could not be read.
    fn drain_msgs(&mut self, user: &[u8], after: u64, limit: usize) -> (Vec<DrainedMsg>, bool) {
        let pending = self.pending.get(user);
        let skip = pending.map_or(0, |p| p.deletes.len());
        let (stored, complete) = match self
            .store()
            .and_then(|s| s.scan_drained(user, after, limit.saturating_add(skip)))
        {
            Ok(v) => (v, true),
            Err(e) => {
                // The messages stay stored; the next login drains them.
                bump(&self.metrics.store_errors, 1);
                error!(error = %e, "drain scan failed");
                (Vec::new(), false)
            }
        };
        if let Some(s) = &self.store {
            self.metrics
                .corrupt_skipped
                .fetch_max(s.corrupt_skipped(), Ordering::Relaxed);
        }
        // What is not in the LSM: pending (this window) and hot (logged, kept in memory).
        let mut fresh: Vec<(u64, &StoredMsg)> = Vec::new();
        if let Some(p) = pending {
            fresh.extend(
                p.inserts
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .take(limit)
                    .map(|(id, m)| (*id, &m.msg)),
            );
        }
        if let Some(h) = &self.hot {
            fresh.extend(h.range(user, after).take(limit).map(|m| (m.id, m)));
        }
        if fresh.is_empty() && pending.is_none_or(|p| p.deletes.is_empty()) {
            return (stored, complete);
        }
        fresh.sort_unstable_by_key(|(id, _)| *id);
        fresh.dedup_by_key(|(id, _)| *id);
        let mut stored = stored
            .into_iter()
            .filter(|m| pending.is_none_or(|p| !p.deletes.contains(&m.id)))
            .peekable();
        let mut fresh = fresh.into_iter().peekable();
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.len() < limit {
            let (take_fresh, duplicate) = match (stored.peek(), fresh.peek()) {
                (None, None) => break,
                (Some(_), None) => (false, false),
                (None, Some(_)) => (true, false),
                (Some(s), Some((fid, _))) => (*fid <= s.id, *fid == s.id),
            };
            if duplicate {
                stored.next(); // the same message stored and pending again: keep one copy
            }
            if take_fresh {
                if let Some((id, m)) = fresh.next() {
                    out.push(DrainedMsg {
                        id,
                        sender: m.sender.clone(),
                        payload: m.payload.clone(),
                        kind: m.kind,
                    });
                }
            } else if let Some(e) = stored.next() {
                out.push(e);
            }
        }
        (out, complete)
    }

    /// Sends a reply without blocking; a full queue parks it (in order) in the overflow list.
    fn reply(&mut self, s: usize, r: CoreReply) {
        let Some(shard) = self.shards.get_mut(s) else {
            return;
        };
        if !shard.overflow.is_empty() {
            shard.overflow.push_back(r);
            bump(&self.metrics.replies_deferred, 1);
            return;
        }
        match shard.tx.try_send(r) {
            Ok(()) => shard.bell.ring(),
            Err(TrySendError::Full(r)) => {
                shard.overflow.push_back(r);
                bump(&self.metrics.replies_deferred, 1);
            }
            Err(TrySendError::Disconnected(_)) => {
                debug!(shard = s, "reply dropped: shard reply queue closed");
            }
        }
    }

    fn flush_overflows(&mut self) {
        for (s, shard) in self.shards.iter_mut().enumerate() {
            while let Some(r) = shard.overflow.pop_front() {
                match shard.tx.try_send(r) {
                    Ok(()) => shard.bell.ring(),
                    Err(TrySendError::Full(r)) => {
                        shard.overflow.push_front(r);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        debug!(
                            shard = s,
                            dropped = shard.overflow.len() + 1,
                            "replies dropped: shard reply queue closed"
                        );
                        shard.overflow.clear();
                    }
                }
            }
        }
    }

    /// Writes everything pending as one atomic batch and fsyncs it. On failure the batch's
    /// messages are not stored: their senders are told (`store_unavailable`) and their quota
    /// released; deletes (acks, expiry) and prekey bundles stay pending; the store is reopened
    /// and the commit retried with backoff.
    fn commit(&mut self) -> Result<(), CoreError> {
        let floor = self.durable_floor();
        if self.pending_ops == 0 && self.max_id_seen <= floor && !self.reopen_needed {
            self.deadline = None;
            self.insert_due.clear();
            return Ok(());
        }
        let started = Instant::now();
        // Every pending insert goes into this commit (written, or refused if it fails).
        self.insert_due.clear();
        self.insert_ids.clear();
        let mut inserts = Vec::new();
        let mut origins = Vec::new();
        let mut deletes = Vec::new();
        for (user, p) in self.pending.drain() {
            for id in p.deletes {
                deletes.push((user.clone(), id));
            }
            for m in p.inserts.into_values() {
                origins.push((m.shard, m.conn, m.client));
                inserts.push(m.msg);
            }
        }
        let mut sent_pending: Vec<_> = self.pending_sent.drain().collect();
        let mut sent: Vec<_> = sent_pending
            .iter()
            .map(|((sender, client), p)| SentRecord {
                sender: sender.clone(),
                client: *client,
                id: p.id,
            })
            .collect();
        // The new messages and dedup records go to the hot log (all of them, so a record stays
        // in one atomic write with its message) while it has room. Every one fits its record
        // layout (names are checked against the store's smaller limits on the way in); should
        // one not, all go to the LSM.
        let to_hot = self.hot.as_ref().is_some_and(HotLog::has_room)
            && inserts.iter().all(hotlog::fits)
            && sent.iter().all(hotlog::fits_sent);
        let (hot_msgs, hot_origins, hot_sent) = if to_hot {
            (
                std::mem::take(&mut inserts),
                std::mem::take(&mut origins),
                std::mem::take(&mut sent),
            )
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        let hot_deletes = std::mem::take(&mut self.hot_deletes);
        // The id floor (leased ahead, written only when passed) goes with the hot frame when
        // there is one; else with the LSM batch.
        let lease = if self.max_id_seen > floor {
            leased_floor(self.max_id_seen)
        } else {
            0
        };
        let mut id_hint = lease;
        if let Some(hot) = self.hot.as_mut() {
            if !hot_msgs.is_empty() || !hot_deletes.is_empty() || !hot_sent.is_empty() || lease > 0
            {
                let n = hot_msgs.len() as u64;
                let hot_floor = lease.max(self.hot_floor);
                match hot.commit(hot_msgs, &hot_deletes, hot_sent, hot_floor, started) {
                    Ok(()) => {
                        self.hot_floor = hot_floor;
                        id_hint = 0;
                        bump(&self.metrics.stored, n);
                        bump(&self.metrics.hot_logged, n);
                        // Durable with their messages: the v2 sends are confirmed now.
                        for ((_, client), p) in std::mem::take(&mut sent_pending) {
                            for w in p.waiting {
                                let outcome = if w.duplicate {
                                    Confirmed::Duplicate
                                } else {
                                    Confirmed::Stored
                                };
                                self.confirm(w.shard, w.conn, client, p.id, outcome);
                            }
                        }
                    }
                    Err((e, back, back_sent)) => {
                        // Its messages go to the LSM in this same commit; the deletes wait.
                        bump(&self.metrics.store_errors, 1);
                        if first_time(&LOGGED_HOT_FAILURE) {
                            error!(
                                error = %e,
                                "hot log write failed: its messages go to the store directly \
                                 (logged once; iris_core_store_errors_total counts)"
                            );
                        } else {
                            debug!(error = %e, "hot log write failed");
                        }
                        inserts = back;
                        origins = hot_origins;
                        sent = back_sent;
                        self.hot_deletes = hot_deletes;
                    }
                }
            }
        }
        let prekeys: Vec<_> = self.pending_prekeys.drain().collect();
        let sent_expired = std::mem::take(&mut self.pending_sent_expired);
        // Nothing for the LSM (the hot log took it all): no write, and no sync of an unchanged
        // journal (this thread never writes without syncing, so nothing else awaits one).
        let lsm_idle = inserts.is_empty()
            && deletes.is_empty()
            && prekeys.is_empty()
            && sent.is_empty()
            && sent_expired.is_empty()
            && id_hint == 0
            && !self.reopen_needed;
        let result = if lsm_idle {
            Ok(())
        } else {
            self.ensure_open().and_then(|()| {
                self.store()?.write(
                    &Batch {
                        inserts: &inserts,
                        deletes: &deletes,
                        prekeys: &prekeys,
                        id_hint,
                        sent: &sent,
                        sent_expired: &sent_expired,
                    },
                    true,
                )
            })
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_commit = Some(Instant::now());
        match result {
            Ok(()) => {
                bump(&self.metrics.stored, inserts.len() as u64);
                bump(&self.metrics.commits, 1);
                for m in &inserts {
                    if self.recent_stores.len() >= RECENT_STORES_MAX {
                        break;
                    }
                    self.recent_stores
                        .insert(m.id, (user_hash(&m.recipient), m.payload.len() as u64));
                }
                bump(&self.metrics.commit_micros_total, micros);
                bump(&self.metrics.dedup_expired, sent_expired.len() as u64);
                debug!(
                    inserts = inserts.len(),
                    deletes = deletes.len(),
                    prekeys = prekeys.len(),
                    sent = sent.len(),
                    sent_expired = sent_expired.len(),
                    micros,
                    "group commit"
                );
                // Durable: the first sends are stored, their resends duplicates.
                for ((_, client), p) in sent_pending {
                    for w in p.waiting {
                        let outcome = if w.duplicate {
                            Confirmed::Duplicate
                        } else {
                            Confirmed::Stored
                        };
                        self.confirm(w.shard, w.conn, client, p.id, outcome);
                    }
                }
                if self.failures > 0 {
                    if first_time(&LOGGED_RECOVERY) {
                        info!(
                            failures = self.failures,
                            "store commits recovered (logged once)"
                        );
                    } else {
                        debug!(failures = self.failures, "store commits recovered");
                    }
                }
                self.failures = 0;
                // Hot deletes whose frame failed wait for the next commit (a new file).
                self.pending_ops = self.hot_deletes.len();
                self.deadline = (!self.hot_deletes.is_empty()).then(|| Instant::now() + HOT_RETRY);
                Ok(())
            }
            Err(e) => {
                bump(&self.metrics.store_errors, 1);
                bump(&self.metrics.failed_messages, inserts.len() as u64);
                self.failures = self.failures.saturating_add(1);
                // fjall refuses every write after a failed one: open it again before the next.
                self.reopen_needed = true;
                if first_time(&LOGGED_COMMIT_FAILURE) {
                    error!(
                        error = %e,
                        messages = inserts.len(),
                        "commit failed: its messages are refused (store_unavailable), acks \
                         retried, the store reopened (logged once; \
                         iris_core_store_errors_total and iris_core_failed_messages_total count)"
                    );
                } else {
                    debug!(error = %e, failures = self.failures, "commit failed again");
                }
                for (m, (shard, conn, client)) in inserts.iter().zip(origins) {
                    self.release(&m.recipient, m.payload.len() as u64);
                    if client.is_none() {
                        self.refusals.insert((shard, conn, REFUSED_STORE_FAILED));
                    }
                }
                // v2 sends of the failed messages (first sends and resends) are refused and
                // their records dropped; records of settled messages wait for the next try.
                let refused = Confirmed::Refused(REFUSED_STORE_FAILED);
                for (key, p) in sent_pending {
                    if p.settled {
                        self.pending_sent.insert(key, p);
                    } else {
                        for w in p.waiting {
                            self.confirm(w.shard, w.conn, key.1, w.id, refused);
                        }
                    }
                }
                // Deletes and bundles wait for the next try (nothing else ran in between: this
                // is the only thread).
                self.pending_ops = deletes.len()
                    + prekeys.len()
                    + self.pending_sent.len()
                    + sent_expired.len()
                    + self.hot_deletes.len();
                self.pending_sent_expired = sent_expired;
                for (user, id) in deletes {
                    self.pending.entry(user).or_default().deletes.insert(id);
                }
                self.pending_prekeys.extend(prekeys);
                let shift = self.failures.saturating_sub(1).min(16);
                let delay = FIRST_RETRY_DELAY
                    .saturating_mul(1 << shift)
                    .min(MAX_RETRY_DELAY);
                self.deadline = Some(Instant::now() + delay);
                Err(e)
            }
        }
    }

    /// Moves the hot messages not acked within one to two periods into the LSM, one durable
    /// batch per due hot log file, and deletes the file after it (see [`crate::hotlog`]).
    fn move_hot(&mut self, now: Instant) {
        if now < self.hot_retry_at {
            return;
        }
        let Some(mut hot) = self.hot.take() else {
            return;
        };
        while hot.rotate_due(now) {
            let moved = hot.take_oldest();
            if let Err(e) = self.write_moved(&moved) {
                bump(&self.metrics.store_errors, 1);
                debug!(error = %e, messages = moved.msgs.len(), "moving hot messages failed");
                hot.restore(moved);
                self.hot_retry_at = now + HOT_RETRY;
                break;
            }
            if let Err(e) = hot.retire_oldest() {
                // Only a replay at the next start (into the LSM, where they already are).
                debug!(error = %e, "hot log file not deleted");
            }
        }
        self.hot = Some(hot);
    }

    /// Writes moved hot messages and dedup records to the LSM (durable) and remembers the
    /// messages as recently stored.
    fn write_moved(&mut self, moved: &hotlog::Moved) -> Result<(), CoreError> {
        let msgs = &moved.msgs;
        let batch = Batch {
            inserts: msgs,
            sent: &moved.sent,
            id_hint: moved.floor,
            ..Batch::default()
        };
        if let Err(e) = self
            .ensure_open()
            .and_then(|()| self.store()?.write(&batch, true))
        {
            self.reopen_needed = true;
            return Err(e);
        }
        bump(&self.metrics.hot_moved, msgs.len() as u64);
        for m in msgs {
            if self.recent_stores.len() >= RECENT_STORES_MAX {
                break;
            }
            self.recent_stores
                .insert(m.id, (user_hash(&m.recipient), m.payload.len() as u64));
        }
        Ok(())
    }

    /// Final take-in, drains answered, durable commit.
    fn finish(mut self) -> Result<(), CoreError> {
        for _ in 0..FINAL_PASSES {
            if self.take_in_all() == 0 {
                break;
            }
        }
        for r in std::mem::take(&mut self.deferred) {
            self.serve_read(r);
        }
        self.flush_answers();
        self.flush_overflows();
        let failed_before = self.metrics.failed_messages.load(Ordering::Relaxed);
        let mut result = self.commit();
        for _ in 1..FINAL_COMMIT_ATTEMPTS {
            if result.is_ok() {
                break;
            }
            if let Some(d) = self.deadline {
                std::thread::sleep(d.saturating_duration_since(Instant::now()));
            }
            result = self.commit();
        }
        if let Some(mut hot) = self.hot.take() {
            // Everything into the LSM, so a stopped store is whole without its hot log (which
            // a failure here leaves to the next start's replay).
            let moved = hot.take_all();
            match self.write_moved(&moved) {
                Ok(()) => {
                    if let Err(e) = hot.retire_all() {
                        warn!(error = %e, "hot log files not deleted: replayed at the next start");
                    }
                }
                Err(e) => {
                    error!(
                        error = %e,
                        messages = moved.msgs.len(),
                        "hot messages not moved into the store: replayed at the next start"
                    );
                }
            }
        }
        if let Err(e) = &result {
            let failed = self.metrics.failed_messages.load(Ordering::Relaxed) - failed_before;
            error!(
                error = %e,
                messages_not_stored = failed,
                deletes_and_bundles_lost = self.pending_ops,
                "final commit failed"
            );
        }
        self.flush_answers();
        self.flush_overflows();
        self.metrics
            .pending_ops
            .store(self.pending_ops as u64, Ordering::Relaxed);
        let unsent: usize = self.shards.iter().map(|s| s.overflow.len()).sum();
        if unsent > 0 {
            warn!(unsent, "replies not taken by shards at shutdown");
        }
        info!(stats = ?self.metrics.snapshot(), "embedded core stopped");
        result
    }
}

/// Hash of a user name for the recent-acks set. Paired with the (unique) message id, a false
/// match needs two different messages with the same id, which the id scheme rules out.
fn user_hash(user: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fault;

    fn msg(id: u64) -> StoredMsg {
        StoredMsg {
            id,
            recipient: b"ruth".to_vec(),
            sender: b"sam".to_vec(),
            payload: id.to_be_bytes().to_vec(),
            kind: 0,
        }
    }

    /// The default configuration on `data_dir`, without expiry: test ids are small numbers
    /// (minted in 2024), which a TTL would find expired.
    fn test_cfg(data_dir: std::path::PathBuf) -> EmbeddedConfig {
        EmbeddedConfig {
            data_dir,
            message_ttl_secs: 0,
            dedup_ttl_secs: 0,
            ..EmbeddedConfig::default()
        }
    }

    fn wait_for(m: &CoreMetrics, what: &str, f: impl Fn(&CoreStats) -> bool) {
        let start = Instant::now();
        while !f(&m.snapshot()) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}: {:?}",
                m.snapshot()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn store_req(m: StoredMsg, conn: ConnId) -> CoreRequest {
        CoreRequest::Store {
            msg: m,
            conn,
            client: None,
            accepted: Instant::now(),
        }
    }

    fn drain_ids(link: &ShardLink, user: &[u8]) -> Vec<u64> {
        drain_answer(link, user, 0).0
    }

    /// A drain of `user`'s messages after `after`: (ids, more, complete).
    fn drain_answer(link: &ShardLink, user: &[u8], after: u64) -> (Vec<u64>, bool, bool) {
        link.to_core
            .send(CoreRequest::Drain {
                user: user.to_vec(),
                conn: 99,
                after,
                limit: 1000,
                resume_after: 0,
            })
            .unwrap();
        loop {
            match link
                .from_core
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
            {
                CoreReply::Drain {
                    msgs,
                    more,
                    complete,
                    ..
                } => return (msgs.iter().map(|m| m.id).collect(), more, complete),
                CoreReply::Refused { .. } => {}
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }

    /// While a commit is pending the core sleeps until its window closes and stores do not
    /// wake it (it wakes once a second at most); a drain is answered at once because the shard
    /// rings `wake_core` for it, and
    /// it includes the store queued before it.
    #[test]
    fn a_drain_rung_for_is_answered_within_a_pending_commit_window() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            commit_window_ms: 60_000,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the first store taken in", |s| s.pending_ops == 1);
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        let start = Instant::now();
        assert_eq!(drain_ids_rung(link, b"ruth"), [1, 2]);
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "the drain waited for the commit window: {:?}",
            start.elapsed()
        );
        core.shutdown().unwrap();
    }

    /// Like [`drain_ids`], but rings the core after queueing the drain, as a shard does: it is
    /// served even while a commit window is open.
    fn drain_ids_rung(link: &ShardLink, user: &[u8]) -> Vec<u64> {
        link.to_core
            .send(CoreRequest::Drain {
                user: user.to_vec(),
                conn: 99,
                after: 0,
                limit: 1000,
                resume_after: 0,
            })
            .unwrap();
        link.wake_core.as_ref().unwrap().try_send(()).unwrap();
        match link
            .from_core
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
        {
            CoreReply::Drain { msgs, .. } => msgs.iter().map(|m| m.id).collect(),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn refusals(link: &ShardLink, within: Duration) -> Vec<(ConnId, &'static str)> {
        let mut out = Vec::new();
        let end = Instant::now() + within;
        while let Ok(r) = link
            .from_core
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            match r {
                CoreReply::Refused { conn, reason } => out.push((conn, reason)),
                other => panic!("unexpected reply {other:?}"),
            }
        }
        out.sort_unstable();
        out
    }

    /// A failed commit (as on a full disk) fails only its own messages: their senders get
    /// `store_unavailable`, nothing is kept in memory for them, drains keep serving what was
    /// stored, the store is reopened, and later messages are stored again.
    #[test]
    fn a_failed_commit_refuses_its_messages_and_the_store_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        // The LSM's failures are tested here: no hot tier.
        let cfg = EmbeddedConfig {
            hot_log_secs: 0,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        for id in 1..=3 {
            link.to_core.send(store_req(msg(id), 7)).unwrap();
        }
        wait_for(&m, "the first commit", |s| s.stored == 3);
        fault::fail_next_writes(&data_dir, 1);
        link.to_core.send(store_req(msg(4), 8)).unwrap();
        link.to_core.send(store_req(msg(5), 9)).unwrap();
        wait_for(&m, "a failed commit", |s| s.store_errors == 1);
        assert_eq!(
            refusals(link, Duration::from_millis(300)),
            vec![(8, REFUSED_STORE_FAILED), (9, REFUSED_STORE_FAILED)]
        );
        let s = m.snapshot();
        assert_eq!((s.failed_messages, s.pending_ops), (2, 0));
        assert_eq!(drain_ids(link, b"ruth"), vec![1, 2, 3]);
        // Recovered: the next message is stored, through a reopened store.
        link.to_core.send(store_req(msg(6), 10)).unwrap();
        wait_for(&m, "recovery", |s| s.stored == 4);
        assert!(m.snapshot().store_reopens >= 1);
        assert_eq!(drain_ids(link, b"ruth"), vec![1, 2, 3, 6]);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"ruth").unwrap(), 4);
    }

    /// A drain that could not read the store says so (`complete: false`): its empty answer
    /// must not be taken for an empty inbox (the edge would skip that user's next drains).
    #[test]
    fn a_drain_that_cannot_read_the_store_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            hot_log_secs: 0,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 7)).unwrap();
        wait_for(&m, "the commit", |s| s.stored == 1);
        fault::fail_next_drain_reads(&data_dir, 1);
        let drain = |after| drain_answer(link, b"ruth", after);
        assert_eq!(drain(0), (vec![], false, false), "the failed read");
        assert_eq!(drain(0), (vec![1], false, true));
        assert_eq!(
            drain(1),
            (vec![], false, true),
            "read completely, nothing after"
        );
        core.shutdown().unwrap();
    }

    /// While commits fail, acks stay pending (retried) and are written once commits work.
    #[test]
    fn acks_survive_failed_commits() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = test_cfg(data_dir.clone());
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        for id in 1..=3 {
            links[0].to_core.send(store_req(msg(id), 1)).unwrap();
        }
        wait_for(&m, "the store", |s| s.stored == 3);
        fault::fail_next_writes(&data_dir, 3);
        ack(&links[0], b"ruth", 2);
        wait_for(&m, "failed commits then recovery", |s| {
            s.store_errors == 3 && s.pending_ops == 0
        });
        assert_eq!(drain_ids(&links[0], b"ruth"), vec![1, 3]);
        core.shutdown().unwrap();
        assert_eq!(
            MessageStore::open(&data_dir)
                .unwrap()
                .count(b"ruth")
                .unwrap(),
            2
        );
    }

    /// The quota counts stored and pending messages per recipient, refuses the excess with
    /// `recipient_inbox_full` (once per connection and pass), frees room on acks, and is
    /// counted from the store after a restart.
    #[test]
    fn quota_refuses_messages_over_the_limit_and_acks_free_room() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            data_dir: data_dir.clone(),
            max_messages_per_user: 3,
            max_bytes_per_user: 64,
            // Test ids are small numbers (minted in 2024): no expiry.
            message_ttl_secs: 0,
            ..EmbeddedConfig::default()
        };
        let (core, links) = EmbeddedCore::start(cfg.clone(), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        for id in 1..=5 {
            link.to_core.send(store_req(msg(id), 3)).unwrap();
        }
        wait_for(&m, "commit and refusals", |s| {
            s.stored == 3 && s.refused_over_quota == 2
        });
        assert_eq!(
            refusals(link, Duration::from_millis(200)),
            vec![(3, REFUSED_INBOX_FULL)]
        );
        // Another recipient is not affected.
        let mut other = msg(6);
        other.recipient = b"sara".to_vec();
        link.to_core.send(store_req(other, 3)).unwrap();
        // An ack frees one place.
        ack(link, b"ruth", 1);
        link.to_core.send(store_req(msg(7), 3)).unwrap();
        link.to_core.send(store_req(msg(8), 4)).unwrap();
        wait_for(&m, "one more stored", |s| {
            s.stored == 5 && s.refused_over_quota == 3
        });
        assert_eq!(
            refusals(link, Duration::from_millis(200)),
            vec![(4, REFUSED_INBOX_FULL)]
        );
        assert_eq!(drain_ids(link, b"ruth"), vec![2, 3, 7]);
        core.shutdown().unwrap();

        // After a restart the count comes from the store: still full. Bytes count too.
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        links[0].to_core.send(store_req(msg(9), 5)).unwrap();
        let mut big = msg(10);
        big.recipient = b"sara".to_vec();
        big.payload = vec![0; 60]; // sara has 8 bytes stored: 68 > 64
        links[0].to_core.send(store_req(big, 6)).unwrap();
        wait_for(&m, "refusals", |s| s.refused_over_quota == 2);
        assert_eq!(
            refusals(&links[0], Duration::from_millis(200)),
            vec![(5, REFUSED_INBOX_FULL), (6, REFUSED_INBOX_FULL)]
        );
        core.shutdown().unwrap();
    }

    /// With room for only 4 recipients' counts, the quota of 30 recipients stays exact: a
    /// forgotten count is read again from the store (and what is pending).
    #[test]
    fn the_quota_stays_exact_when_counts_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            data_dir: dir.path().join("core"),
            // Test ids are small numbers (minted in 2024): no expiry.
            message_ttl_secs: 0,
            max_messages_per_user: 2,
            usage_cache_users: 4,
            commit_window_ms: 50,
            ..EmbeddedConfig::default()
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let mut id = 0;
        for round in 0..3 {
            for u in 0..30 {
                id += 1;
                let mut msg = msg(id);
                msg.recipient = format!("user-{u}").into_bytes();
                links[0].to_core.send(store_req(msg, round)).unwrap();
            }
        }
        wait_for(&m, "stores and refusals", |s| {
            s.stored == 60 && s.refused_over_quota == 30
        });
        core.shutdown().unwrap();
    }

    /// An id whose time is `age` before now (shard 0).
    fn id_aged(age: Duration, seq: u64) -> u64 {
        let micros = iris_bus::hops::unix_micros() - age.as_micros() as u64;
        (((micros - iris_bus::hops::ID_EPOCH_MICROS) / 16) << 18) + seq
    }

    /// Messages older than the TTL are not drained and are deleted: at the drain for a user
    /// who logs in, by the sweep for one who never does.
    #[test]
    fn expired_messages_are_not_drained_and_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            data_dir: data_dir.clone(),
            message_ttl_secs: 3600,
            max_messages_per_user: 4,
            ..EmbeddedConfig::default()
        };
        let old = id_aged(Duration::from_secs(7200), 0);
        let new = id_aged(Duration::from_secs(10), 0);
        {
            // Written directly: messages accepted long ago.
            let store = MessageStore::open(&data_dir).unwrap();
            let mut all = Vec::new();
            for user in ["ruth", "never"] {
                for i in 0..3 {
                    let mut m = msg(old + i);
                    m.recipient = user.as_bytes().to_vec();
                    all.push(m);
                }
            }
            let mut fresh = msg(new);
            fresh.recipient = b"ruth".to_vec();
            all.push(fresh);
            store.commit(&all, &[], true).unwrap();
        }
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        assert_eq!(drain_ids(&links[0], b"ruth"), vec![new]);
        // The sweep gets the user who never logs in.
        wait_for(&m, "expiry", |s| {
            s.expired_deleted == 6 && s.pending_ops == 0
        });
        // Room again under the quota of 4: 1 live + 3 new.
        for i in 1..=3 {
            links[0].to_core.send(store_req(msg(new + i), 1)).unwrap();
        }
        wait_for(&m, "stores", |s| s.stored == 3);
        assert_eq!(m.snapshot().refused_over_quota, 0);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"never").unwrap(), 0);
        assert_eq!(store.count(b"ruth").unwrap(), 4);
    }

    /// An ack of an id that is not stored (never delivered) writes nothing: no tombstone, no
    /// commit, no fsync.
    #[test]
    fn acks_of_ids_not_stored_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_cfg(dir.path().join("core"));
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        links[0].to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the store", |s| s.commits == 1);
        for id in 100..1100 {
            ack(&links[0], b"ruth", id);
        }
        wait_for(&m, "acks", |s| s.acks_not_stored == 1000);
        std::thread::sleep(Duration::from_millis(50));
        let s = m.snapshot();
        assert_eq!((s.commits, s.pending_ops), (1, 0), "{s:?}");
        // A real ack still deletes.
        ack(&links[0], b"ruth", 1);
        wait_for(&m, "the delete", |s| s.commits == 2);
        assert!(drain_ids(&links[0], b"ruth").is_empty());
        core.shutdown().unwrap();
    }

    fn ack(link: &ShardLink, user: &[u8], id: u64) {
        link.to_core
            .send(CoreRequest::Ack {
                user: user.to_vec(),
                id,
            })
            .unwrap();
    }

    /// An ack of a message committed moments ago deletes it without a lookup and frees its
    /// place under the quota once: acking it again is a lookup that finds nothing, and the
    /// place is not freed twice.
    #[test]
    fn an_ack_of_a_message_just_committed_needs_no_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            max_messages_per_user: 2,
            hot_log_secs: 0,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        wait_for(&m, "the stores", |s| s.stored == 2);
        // A message of another recipient with the same id is not this one.
        ack(link, b"sara", 1);
        wait_for(&m, "the ack for sara", |s| s.acks_not_stored == 1);
        ack(link, b"ruth", 1);
        wait_for(&m, "the ack and its delete", |s| {
            s.acks_of_recent_stores == 1 && s.pending_ops == 0 && s.commits == 2
        });
        link.to_core.send(store_req(msg(3), 1)).unwrap();
        wait_for(&m, "the store in the freed place", |s| s.stored == 3);
        ack(link, b"ruth", 1);
        wait_for(&m, "the second ack", |s| s.acks_not_stored == 2);
        link.to_core.send(store_req(msg(4), 2)).unwrap();
        wait_for(&m, "the refusal", |s| s.refused_over_quota == 1);
        assert_eq!(
            refusals(link, Duration::from_millis(200)),
            vec![(2, REFUSED_INBOX_FULL)]
        );
        assert_eq!(drain_ids(link, b"ruth"), vec![2, 3]);
        let s = m.snapshot();
        assert_eq!((s.acks_of_recent_stores, s.stored), (1, 3), "{s:?}");
        core.shutdown().unwrap();
    }

    static IDLE_HOOKS: AtomicU64 = AtomicU64::new(0);

    fn count_idle_hook() {
        IDLE_HOOKS.fetch_add(1, Ordering::Relaxed);
    }

    fn wait_for_hooks(n: u64) {
        let start = Instant::now();
        while IDLE_HOOKS.load(Ordering::Relaxed) < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the idle hook did not run {n} times"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The idle hook runs on the core thread once the core has been idle for a second after
    /// some work, once per idle period: not while it starts idle, not again while it stays idle.
    #[test]
    fn the_idle_hook_runs_once_per_idle_period() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            idle_hook: Some(count_idle_hook),
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        std::thread::sleep(IDLE_HOOK_AFTER + Duration::from_millis(500));
        assert_eq!(IDLE_HOOKS.load(Ordering::Relaxed), 0, "idle from the start");
        let busy = Instant::now();
        links[0].to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the store", |s| s.stored == 1);
        wait_for_hooks(1);
        assert!(
            busy.elapsed() >= IDLE_HOOK_AFTER,
            "ran before a second of idleness"
        );
        std::thread::sleep(IDLE_HOOK_AFTER * 2);
        assert_eq!(
            IDLE_HOOKS.load(Ordering::Relaxed),
            1,
            "once per idle period"
        );
        ack(&links[0], b"ruth", 1);
        wait_for_hooks(2);
        core.shutdown().unwrap();
    }

    /// A message the expiry sweep deleted is forgotten by the memory of recent commits: an ack
    /// that comes after the sweep is a lookup (nothing stored), not a second release.
    #[test]
    fn an_ack_after_the_expiry_of_a_message_just_committed_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            data_dir: dir.path().join("core"),
            message_ttl_secs: 10,
            dedup_ttl_secs: 0,
            ..EmbeddedConfig::default()
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let old = id_aged(Duration::from_secs(20), 0);
        links[0].to_core.send(store_req(msg(old), 1)).unwrap();
        wait_for(&m, "the store", |s| s.stored == 1);
        wait_for(&m, "the expiry", |s| {
            s.expired_deleted == 1 && s.pending_ops == 0
        });
        ack(&links[0], b"ruth", old);
        wait_for(&m, "the ack", |s| s.acks_not_stored == 1);
        assert_eq!(m.snapshot().acks_of_recent_stores, 0);
        core.shutdown().unwrap();
    }

    /// A final commit that keeps failing makes shutdown return the error (nothing silent).
    #[test]
    fn shutdown_reports_a_final_commit_that_keeps_failing() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            data_dir: data_dir.clone(),
            commit_window_ms: 3_600_000,
            // Test ids are small numbers (minted in 2024): no expiry.
            message_ttl_secs: 0,
            hot_log_secs: 0,
            ..EmbeddedConfig::default()
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        links[0].to_core.send(store_req(msg(1), 1)).unwrap();
        let m = core.metrics();
        wait_for(&m, "the store", |s| s.pending_ops == 1);
        fault::fail_next_writes(&data_dir, 1000);
        let err = core.shutdown().unwrap_err();
        assert!(matches!(err, CoreError::Io(_)), "{err}");
        assert_eq!(
            m.snapshot().failed_messages,
            1,
            "the lost message is reported"
        );
        fault::fail_next_writes(&data_dir, 0);
    }

    /// A v2 store: `m` sent on `conn` with client message id `client`.
    fn send_v2(link: &ShardLink, m: StoredMsg, conn: ConnId, client: u64) {
        link.to_core
            .send(CoreRequest::Store {
                msg: m,
                conn,
                client: Some(client),
                accepted: Instant::now(),
            })
            .unwrap();
    }

    fn from(sender: &str, id: u64) -> StoredMsg {
        StoredMsg {
            sender: sender.as_bytes().to_vec(),
            ..msg(id)
        }
    }

    /// Waits for `n` confirms (any other reply fails the test): `(conn, confirm)`, sorted.
    fn confirms(link: &ShardLink, n: usize) -> Vec<(ConnId, Confirm)> {
        let mut out = Vec::new();
        while out.len() < n {
            match link
                .from_core
                .recv_timeout(Duration::from_secs(10))
                .expect("confirms")
            {
                CoreReply::Confirms { conn, confirms } => {
                    assert!(!confirms.is_empty(), "an empty Confirms reply");
                    out.extend(confirms.into_iter().map(|c| (conn, c)));
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
        out.sort_unstable_by_key(|(conn, c)| (*conn, c.client, c.id));
        out
    }

    fn stored(client: u64, id: u64) -> Confirm {
        Confirm {
            client,
            id,
            outcome: Confirmed::Stored,
        }
    }

    fn duplicate(client: u64, id: u64) -> Confirm {
        Confirm {
            client,
            id,
            outcome: Confirmed::Duplicate,
        }
    }

    /// A v2 send is confirmed Stored only once its commit (with the fsync) is done: nothing
    /// comes while the window is open.
    #[test]
    fn a_client_send_is_confirmed_stored_only_after_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            commit_window_ms: 1_500,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let start = Instant::now();
        send_v2(&links[0], msg(1), 4, 77);
        wait_for(&m, "the store taken in", |s| s.pending_ops == 2);
        assert!(
            links[0]
                .from_core
                .recv_timeout(Duration::from_millis(800))
                .is_err(),
            "a reply came before the commit window closed"
        );
        assert_eq!(m.snapshot().commits, 0);
        assert_eq!(confirms(&links[0], 1), vec![(4, stored(77, 1))]);
        assert!(start.elapsed() >= Duration::from_millis(1_400));
        let s = m.snapshot();
        assert_eq!((s.commits, s.stored, s.pending_ops), (1, 1, 0), "{s:?}");
        core.shutdown().unwrap();
    }

    /// A resend of the same (sender, client) is a Duplicate with the first id, in the same
    /// window, after the commit, and after a restart; only one copy is stored and drained. The
    /// same client id from another sender is its own message.
    #[test]
    fn resends_are_duplicates_in_the_window_after_the_commit_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            commit_window_ms: 200,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg.clone(), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        send_v2(link, msg(1), 1, 7);
        send_v2(link, msg(2), 2, 7); // a resend (the edge minted a new id)
        send_v2(link, from("tom", 3), 3, 7); // another sender, the same client id
        assert_eq!(
            confirms(link, 3),
            vec![(1, stored(7, 1)), (2, duplicate(7, 1)), (3, stored(7, 3))]
        );
        // Committed: a resend is found in the store.
        send_v2(link, msg(4), 4, 7);
        assert_eq!(confirms(link, 1), vec![(4, duplicate(7, 1))]);
        assert_eq!(drain_ids(link, b"ruth"), vec![1, 3]);
        let s = m.snapshot();
        assert_eq!((s.stored, s.duplicate_sends), (2, 2), "{s:?}");
        core.shutdown().unwrap();

        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        send_v2(&links[0], msg(5), 5, 7);
        send_v2(&links[0], from("tom", 6), 6, 7);
        send_v2(&links[0], msg(8), 8, 8); // a new client id
        assert_eq!(
            confirms(&links[0], 3),
            vec![
                (5, duplicate(7, 1)),
                (6, duplicate(7, 3)),
                (8, stored(8, 8))
            ]
        );
        assert_eq!(drain_ids(&links[0], b"ruth"), vec![1, 3, 8]);
        assert_eq!(m.snapshot().duplicate_sends, 2);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"ruth").unwrap(), 3);
        assert_eq!(store.sent_id(b"sam", 7).unwrap(), Some(1));
        assert_eq!(store.sent_id(b"tom", 7).unwrap(), Some(3));
        assert_eq!(store.sent_id(b"sam", 9).unwrap(), None);
    }

    /// Over quota a v2 send gets Refused(recipient_inbox_full) with its client id, and no
    /// record (a later resend may be stored); a v1 send still gets CoreReply::Refused.
    #[test]
    fn over_quota_a_client_send_is_refused_in_a_confirm_and_v1_still_gets_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            max_messages_per_user: 1,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the first store", |s| s.stored == 1);
        send_v2(link, msg(2), 2, 9);
        assert_eq!(
            confirms(link, 1),
            vec![(
                2,
                Confirm {
                    client: 9,
                    id: 2,
                    outcome: Confirmed::Refused(REFUSED_INBOX_FULL)
                }
            )]
        );
        link.to_core.send(store_req(msg(3), 3)).unwrap();
        assert_eq!(
            refusals(link, Duration::from_millis(300)),
            vec![(3, REFUSED_INBOX_FULL)]
        );
        // Room again: the resend is stored (the refusal left no record).
        ack(link, b"ruth", 1);
        send_v2(link, msg(4), 4, 9);
        assert_eq!(confirms(link, 1), vec![(4, stored(9, 4))]);
        assert_eq!(m.snapshot().refused_over_quota, 2);
        core.shutdown().unwrap();
    }

    /// A failed commit refuses its v2 sends and their resends (store_unavailable, with the
    /// client id) and writes no record: the next resend is stored.
    #[test]
    fn a_failed_commit_refuses_client_sends_and_writes_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        // The LSM's failures are tested here: no hot tier.
        let cfg = EmbeddedConfig {
            commit_window_ms: 100,
            hot_log_secs: 0,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let link = &links[0];
        fault::fail_next_writes(&data_dir, 1);
        send_v2(link, msg(1), 1, 5);
        send_v2(link, msg(2), 2, 5);
        let refused = Confirmed::Refused(REFUSED_STORE_FAILED);
        assert_eq!(
            confirms(link, 2),
            vec![
                (
                    1,
                    Confirm {
                        client: 5,
                        id: 1,
                        outcome: refused
                    }
                ),
                (
                    2,
                    Confirm {
                        client: 5,
                        id: 2,
                        outcome: refused
                    }
                )
            ]
        );
        send_v2(link, msg(3), 3, 5);
        assert_eq!(confirms(link, 1), vec![(3, stored(5, 3))]);
        assert_eq!(drain_ids(link, b"ruth"), vec![3]);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.sent_id(b"sam", 5).unwrap(), Some(3));
    }

    /// A v2 send acked before its commit is confirmed Stored at the ack, never written, and its
    /// record is still written durably: a resend is a Duplicate, before and after a restart.
    #[test]
    fn a_client_send_acked_before_its_commit_is_stored_and_its_record_written() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            commit_window_ms: 1_000,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg.clone(), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        send_v2(link, msg(1), 1, 5);
        wait_for(&m, "the store taken in", |s| s.pending_ops == 2);
        ack(link, b"ruth", 1);
        // A drain (rung for) takes the ack in at once; the confirm comes in the same pass.
        link.to_core
            .send(CoreRequest::Drain {
                user: b"ruth".to_vec(),
                conn: 99,
                after: 0,
                limit: 10,
                resume_after: 0,
            })
            .unwrap();
        link.wake_core.as_ref().unwrap().try_send(()).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(
                link.from_core
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap(),
            );
        }
        assert_eq!(m.snapshot().commits, 0, "confirmed before any commit");
        assert!(got.iter().any(|r| matches!(
            r,
            CoreReply::Confirms { conn: 1, confirms } if confirms == &[stored(5, 1)]
        )));
        assert!(got
            .iter()
            .any(|r| matches!(r, CoreReply::Drain { msgs, .. } if msgs.is_empty())));
        // A resend while the record is pending: a duplicate at once.
        send_v2(link, msg(2), 2, 5);
        link.wake_core.as_ref().unwrap().try_send(()).unwrap();
        assert_eq!(confirms(link, 1), vec![(2, duplicate(5, 1))]);
        wait_for(&m, "the commit", |s| s.commits == 1 && s.pending_ops == 0);
        let s = m.snapshot();
        assert_eq!((s.stored, s.cancelled_before_store), (0, 1), "{s:?}");
        core.shutdown().unwrap();

        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        send_v2(&links[0], msg(3), 3, 5);
        assert_eq!(confirms(&links[0], 1), vec![(3, duplicate(5, 1))]);
        assert!(drain_ids(&links[0], b"ruth").is_empty());
        core.shutdown().unwrap();
    }

    /// Dedup records older than dedup_ttl_secs are deleted by the sweep, in whole buckets and
    /// (records of older builds) one by one: a resend after that is a new message; a younger
    /// record still answers Duplicate.
    #[test]
    fn dedup_records_expire_after_dedup_ttl_secs() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let old = id_aged(Duration::from_secs(7200), 0);
        let young = id_aged(Duration::from_secs(10), 0);
        {
            // Written directly: records of sends long ago, in buckets of this TTL's width.
            let store = MessageStore::open(&data_dir)
                .unwrap()
                .with_dedup_ttl_secs(3600);
            let rec = |client, id| SentRecord {
                sender: b"sam".to_vec(),
                client,
                id,
            };
            let sent = [rec(1, old), rec(2, old + 1), rec(3, young)];
            store
                .write(
                    &Batch {
                        sent: &sent,
                        ..Batch::default()
                    },
                    true,
                )
                .unwrap();
            let legacy = [rec(4, old + 2), rec(5, young + 1)];
            store.write_legacy_sent(&legacy).unwrap();
        }
        let cfg = EmbeddedConfig {
            dedup_ttl_secs: 3600,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        wait_for(&m, "the dedup expiry", |s| {
            s.dedup_expired == 3 && s.pending_ops == 0
        });
        let now = id_aged(Duration::ZERO, 0);
        send_v2(&links[0], msg(now + 1), 1, 1);
        send_v2(&links[0], msg(now + 2), 2, 3);
        assert_eq!(
            confirms(&links[0], 2),
            vec![(1, stored(1, now + 1)), (2, duplicate(3, young))]
        );
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.sent_id(b"sam", 1).unwrap(), Some(now + 1));
        assert_eq!(store.sent_id(b"sam", 2).unwrap(), None);
        assert_eq!(store.sent_id(b"sam", 3).unwrap(), Some(young));
        assert_eq!(store.sent_id(b"sam", 4).unwrap(), None);
        assert_eq!(store.sent_id(b"sam", 5).unwrap(), Some(young + 1));
        // Only the buckets of the young record and of the new send are left (one bucket, or
        // two when a bucket boundary fell in the 10 s between them).
        let holds = |(lo, hi): (u64, u64), id: u64| lo <= id && id < hi;
        let left = store.sent_buckets();
        assert!(
            left.iter().any(|&b| holds(b, young)),
            "the young record's bucket: {left:?}"
        );
        assert!(
            left.iter().all(|&b| holds(b, young) || holds(b, now + 1)),
            "an expired bucket is left: {left:?}"
        );
        assert!(left.len() <= 2, "{left:?}");
    }

    /// Drains carry each message's sender, for stored and pending messages alike.
    #[test]
    fn drains_carry_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            commit_window_ms: 60_000,
            ..test_cfg(dir.path().join("core"))
        };
        let data_dir = cfg.data_dir.clone();
        {
            let store = MessageStore::open(&data_dir).unwrap();
            store.commit(&[from("sam", 1)], &[], true).unwrap();
        }
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let link = &links[0];
        link.to_core.send(store_req(from("tom", 2), 1)).unwrap();
        link.to_core
            .send(CoreRequest::Drain {
                user: b"ruth".to_vec(),
                conn: 9,
                after: 0,
                limit: 10,
                resume_after: 0,
            })
            .unwrap();
        link.wake_core.as_ref().unwrap().try_send(()).unwrap();
        match link
            .from_core
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
        {
            CoreReply::Drain { msgs, .. } => assert_eq!(
                msgs,
                vec![
                    DrainedMsg {
                        id: 1,
                        sender: b"sam".to_vec(),
                        payload: 1u64.to_be_bytes().to_vec(),
                        kind: 0,
                    },
                    DrainedMsg {
                        id: 2,
                        sender: b"tom".to_vec(),
                        payload: 2u64.to_be_bytes().to_vec(),
                        kind: 0,
                    }
                ]
            ),
            other => panic!("unexpected reply {other:?}"),
        }
        core.shutdown().unwrap();
    }

    /// A message whose ack comes after its commit is written to the hot log only: the ack
    /// deletes it there, and the LSM never holds it. What is not acked is in the LSM after a
    /// shutdown, and the hot log is gone.
    #[test]
    fn late_acks_of_hot_messages_never_reach_the_lsm() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let (core, links) = EmbeddedCore::start(test_cfg(data_dir.clone()), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        for id in 1..=3 {
            link.to_core.send(store_req(msg(id), 1)).unwrap();
        }
        wait_for(&m, "the hot commit", |s| s.hot_logged == 3);
        ack(link, b"ruth", 1);
        ack(link, b"ruth", 2);
        wait_for(&m, "the acks", |s| s.acks_of_hot == 2 && s.pending_ops == 0);
        assert_eq!(drain_ids(link, b"ruth"), vec![3]);
        let s = m.snapshot();
        assert_eq!(
            (s.stored, s.hot_moved, s.acks_of_recent_stores),
            (3, 0, 0),
            "{s:?}"
        );
        let stats = core.shutdown().unwrap();
        assert_eq!(
            stats.hot_moved, 1,
            "the unacked message is moved at shutdown"
        );
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"ruth").unwrap(), 1);
        assert_eq!(store.id_floor(), leased_floor(3));
        let left = std::fs::read_dir(data_dir.join(HOT_DIR)).unwrap().count();
        assert_eq!(left, 0, "hot log files left after a clean shutdown");
    }

    /// Hot messages not acked within one to two periods move into the LSM (their acks then
    /// delete them there), and drains merge the LSM, the hot tier and the pending window in id
    /// order.
    #[test]
    fn unacked_hot_messages_move_into_the_lsm_and_drains_merge_every_tier() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            commit_window_ms: 300,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        wait_for(&m, "the hot commit", |s| s.hot_logged == 2);
        let logged = Instant::now();
        wait_for(&m, "the move", |s| s.hot_moved == 2);
        let waited = logged.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "moved after {waited:?}, before one period"
        );
        link.to_core.send(store_req(msg(3), 1)).unwrap();
        wait_for(&m, "the second hot commit", |s| s.hot_logged == 3);
        // Message 4 is still inside its (300 ms) commit window when the drain is served.
        link.to_core.send(store_req(msg(4), 1)).unwrap();
        // A drain rings the core (as a shard does), so it is served inside the window.
        assert_eq!(drain_ids_rung(link, b"ruth"), [1, 2, 3, 4]);
        assert_eq!(
            m.snapshot().hot_logged,
            3,
            "message 4 was drained while pending"
        );
        ack(link, b"ruth", 1);
        ack(link, b"ruth", 3);
        wait_for(&m, "the acks", |s| {
            s.acks_of_recent_stores == 1 && s.acks_of_hot == 1 && s.pending_ops == 0
        });
        assert_eq!(drain_ids(link, b"ruth"), vec![2, 4]);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"ruth").unwrap(), 2);
    }

    /// What a crash leaves in the hot log is in the store when the core starts again, with the
    /// id floor it recorded, before any request is served.
    #[test]
    fn a_hot_log_left_by_a_crash_is_replayed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let hot_dir = data_dir.join(HOT_DIR);
        let rec = hotlog::recover(&hot_dir).unwrap();
        let mut hot = HotLog::new(&hot_dir, &rec, Duration::from_secs(1), 1 << 20);
        let now = Instant::now();
        hot.commit(vec![msg(5), msg(6), msg(7)], &[], Vec::new(), 40, now)
            .unwrap();
        hot.commit(Vec::new(), &[(b"ruth".to_vec(), 6)], Vec::new(), 41, now)
            .unwrap();
        drop(hot);
        let (core, links) = EmbeddedCore::start(test_cfg(data_dir.clone()), 1).unwrap();
        assert_eq!(core.id_floor(), 41, "the floor of the last frame");
        assert_eq!(drain_ids(&links[0], b"ruth"), vec![5, 7]);
        assert_eq!(std::fs::read_dir(&hot_dir).unwrap().count(), 0);
        core.shutdown().unwrap();
    }

    /// The quota counts hot messages, and an ack of one frees its place.
    #[test]
    fn the_quota_counts_hot_messages() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            max_messages_per_user: 2,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        wait_for(&m, "the hot commit", |s| s.hot_logged == 2);
        link.to_core.send(store_req(msg(3), 3)).unwrap();
        wait_for(&m, "the refusal", |s| s.refused_over_quota == 1);
        ack(link, b"ruth", 1);
        wait_for(&m, "the ack", |s| s.acks_of_hot == 1);
        link.to_core.send(store_req(msg(4), 4)).unwrap();
        wait_for(&m, "the store in the freed place", |s| s.hot_logged == 3);
        assert_eq!(drain_ids(link, b"ruth"), vec![2, 4]);
        core.shutdown().unwrap();
    }

    /// A hot log that cannot be written sends its messages to the LSM in the same commit (they
    /// are stored, not refused), and the next commit uses a new hot log file.
    #[test]
    fn a_failed_hot_log_write_falls_back_to_the_lsm() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let hot_dir = data_dir.join(HOT_DIR);
        let (core, links) = EmbeddedCore::start(test_cfg(data_dir.clone()), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        // A file where the directory was: no hot log file can be created.
        std::fs::remove_dir(&hot_dir).unwrap();
        std::fs::write(&hot_dir, b"not a directory").unwrap();
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the commit", |s| s.stored == 1);
        let s = m.snapshot();
        assert_eq!(
            (s.hot_logged, s.store_errors, s.failed_messages),
            (0, 1, 0),
            "{s:?}"
        );
        assert!(refusals(link, Duration::from_millis(100)).is_empty());
        std::fs::remove_file(&hot_dir).unwrap();
        std::fs::create_dir(&hot_dir).unwrap();
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        wait_for(&m, "the hot commit", |s| s.hot_logged == 1);
        assert_eq!(drain_ids(link, b"ruth"), vec![1, 2]);
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.count(b"ruth").unwrap(), 2);
    }

    /// The id floor is written a second of id clock ahead: a window whose messages were all
    /// acked inside it then commits nothing (no write, no sync), and a restart still seeds
    /// above every id.
    #[test]
    fn a_window_of_cancelled_messages_writes_nothing_under_the_floor_lease() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let cfg = EmbeddedConfig {
            commit_window_ms: 100,
            ..test_cfg(data_dir.clone())
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        ack(link, b"ruth", 1);
        wait_for(&m, "the first window", |s| {
            s.cancelled_before_store == 1 && s.commits == 1
        });
        // Ids above the last one but under the lease: nothing to write.
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        ack(link, b"ruth", 2);
        wait_for(&m, "the second cancel", |s| s.cancelled_before_store == 2);
        std::thread::sleep(Duration::from_millis(300));
        let s = m.snapshot();
        assert_eq!((s.commits, s.stored, s.pending_ops), (1, 0, 0), "{s:?}");
        core.shutdown().unwrap();
        let (core, _links) = EmbeddedCore::start(test_cfg(data_dir), 1).unwrap();
        assert_eq!(core.id_floor(), leased_floor(1));
        assert!(core.id_floor() > 2);
        core.shutdown().unwrap();
    }

    /// Each message has its own window, counted from when the edge accepted it: a message
    /// accepted late in an earlier message's window and acked within its own is never
    /// written, though the earlier one's window closed while it was unacked.
    #[test]
    fn a_message_acked_within_its_own_window_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            commit_window_ms: 1_000,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        // The first commit writes the id floor (leased ahead of the ids below).
        link.to_core.send(store_req(msg(1), 1)).unwrap();
        ack(link, b"ruth", 1);
        wait_for(&m, "the floor's commit", |s| s.commits == 1);
        let t0 = Instant::now();
        link.to_core.send(store_req(msg(2), 1)).unwrap();
        sleep_until(t0 + Duration::from_millis(600));
        link.to_core.send(store_req(msg(3), 1)).unwrap();
        sleep_until(t0 + Duration::from_millis(650));
        // Within 2's window (to t0 + 1 s). That window closes with 3 unacked: 3's own runs to
        // t0 + 1.6 s.
        ack(link, b"ruth", 2);
        sleep_until(t0 + Duration::from_millis(1_100));
        ack(link, b"ruth", 3);
        wait_for(&m, "both cancels", |s| s.cancelled_before_store == 3);
        sleep_until(t0 + Duration::from_millis(1_900));
        let s = m.snapshot();
        assert_eq!((s.commits, s.stored, s.pending_ops), (1, 0, 0), "{s:?}");
        core.shutdown().unwrap();
    }

    /// The window counts from the edge's accept, not from the core's take-in: a store accepted
    /// a window ago is written at once. A second one is not written sooner than a window after
    /// the commit before it ended (a backlog makes one commit per window, not one per pass),
    /// but by then.
    #[test]
    fn a_store_accepted_a_window_ago_is_written_at_once_and_commits_stay_a_window_apart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedConfig {
            commit_window_ms: 2_000,
            ..test_cfg(dir.path().join("core"))
        };
        let (core, links) = EmbeddedCore::start(cfg, 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        let old = |id| CoreRequest::Store {
            msg: msg(id),
            conn: 1,
            client: None,
            accepted: Instant::now() - Duration::from_secs(2),
        };
        let t0 = Instant::now();
        link.to_core.send(old(1)).unwrap();
        wait_for(&m, "the first commit", |s| s.commits == 1);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        let t1 = Instant::now();
        link.to_core.send(old(2)).unwrap();
        wait_for(&m, "the store taken in", |s| s.pending_ops == 1);
        sleep_until(t0 + Duration::from_millis(1_500));
        assert_eq!(
            m.snapshot().commits,
            1,
            "a commit less than a window after the last"
        );
        wait_for(&m, "the second commit", |s| s.commits == 2);
        assert!(t1.elapsed() < Duration::from_secs(4), "{:?}", t1.elapsed());
        assert_eq!(m.snapshot().stored, 2);
        core.shutdown().unwrap();
    }

    /// The front is the earliest deadline even when a later push is earlier than those before
    /// it (a store accepted earlier, taken in after): they are pulled forward to it.
    #[test]
    fn due_queue_front_is_the_earliest_deadline() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut q = DueQueue::default();
        q.push(t + ms(30), 1);
        q.push(t + ms(40), 2);
        q.push(t + ms(35), 3); // earlier than 2: pulls 2 forward to 35
        q.push(t + ms(10), 4); // earlier than all: pulls them all to 10
        q.push(t + ms(50), 5);
        let order: Vec<_> = std::iter::from_fn(|| {
            let e = q.front().copied();
            q.pop_front();
            e
        })
        .map(|(due, id)| (due - t, id))
        .collect();
        assert_eq!(
            order,
            vec![
                (ms(10), 1),
                (ms(10), 2),
                (ms(10), 3),
                (ms(10), 4),
                (ms(50), 5)
            ]
        );
        q.push(t + ms(20), 6);
        q.push(t + ms(25), 7);
        q.clear();
        assert!(q.front().is_none());
    }

    fn sleep_until(t: Instant) {
        std::thread::sleep(t.saturating_duration_since(Instant::now()));
    }

    /// A v2 send goes to the hot log with its dedup record: confirmed once that frame is
    /// synced, a resend is answered from the hot record (before and after the message's ack),
    /// and the record reaches the LSM with the message's file even though the message was
    /// acked.
    #[test]
    fn v2_sends_and_their_dedup_records_go_to_the_hot_log() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let (core, links) = EmbeddedCore::start(test_cfg(data_dir.clone()), 1).unwrap();
        let m = core.metrics();
        let link = &links[0];
        send_v2(link, from("sam", 1), 1, 7);
        assert_eq!(confirms(link, 1), vec![(1, stored(7, 1))]);
        let s = m.snapshot();
        assert_eq!((s.hot_logged, s.stored), (1, 1), "{s:?}");
        // A resend (a new id) is the first message.
        send_v2(link, from("sam", 2), 2, 7);
        assert_eq!(confirms(link, 1), vec![(2, duplicate(7, 1))]);
        ack(link, b"ruth", 1);
        wait_for(&m, "the ack", |s| s.acks_of_hot == 1 && s.pending_ops == 0);
        send_v2(link, from("sam", 3), 3, 7);
        assert_eq!(confirms(link, 1), vec![(3, duplicate(7, 1))]);
        let s = m.snapshot();
        assert_eq!(
            (s.duplicate_sends, s.stored, s.hot_moved),
            (2, 1, 0),
            "{s:?}"
        );
        core.shutdown().unwrap();
        let store = MessageStore::open(&data_dir).unwrap();
        assert_eq!(store.sent_id(b"sam", 7).unwrap(), Some(1));
        assert_eq!(
            store.count(b"ruth").unwrap(),
            0,
            "the acked message is not stored"
        );
    }

    /// A commit whose work all went to the hot log does not touch the LSM: no write, no sync
    /// of its unchanged journal (an injected LSM failure stays unused).
    #[test]
    fn a_commit_with_only_hot_work_leaves_the_lsm_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("core");
        let (core, links) = EmbeddedCore::start(test_cfg(data_dir.clone()), 1).unwrap();
        let m = core.metrics();
        fault::fail_next_writes(&data_dir, 1);
        links[0].to_core.send(store_req(msg(1), 1)).unwrap();
        wait_for(&m, "the hot commit", |s| {
            s.hot_logged == 1 && s.commits == 1
        });
        ack(&links[0], b"ruth", 1);
        wait_for(&m, "the ack's commit", |s| {
            s.acks_of_hot == 1 && s.commits == 2
        });
        let s = m.snapshot();
        assert_eq!((s.store_errors, s.failed_messages), (0, 0), "{s:?}");
        assert!(fault::take(&data_dir), "the LSM was written");
        core.shutdown().unwrap();
    }
}
