//! Sessions in Redis: where each logged-in user is connected.
//!
//! Every user with a session has a Redis hash at `session:{user}` (the user's bytes appended
//! verbatim to `b"session:"`, so names may hold `:` or non-UTF-8 bytes) with the fields
//! `node`, `shard`, `region`, `last_seen` (unix seconds; `0` while online) and `online`
//! (`1`/`0`). The key carries a TTL ([`SessionConfig::ttl_secs`], 24 h by default) that is
//! refreshed while the user stays connected.
//!
//! An edge writes [`SessionOp::Online`] when a user's first session on it begins and
//! [`SessionOp::Offline`] when the last one ends. A user who moves to another edge logs in there
//! before the old connection closes, so the old edge's `Offline` may arrive after the new edge's
//! `Online`. The rule: an `Online` always takes the record; an `Offline` (which carries the
//! writer's `node` and `region`) marks the record offline (`last_seen`, `online = 0`, TTL
//! re-armed) only when the stored record is at that same node and region, or when there is no
//! record or it has no `node` (then it writes an offline record without a location). When another
//! node or region holds the record, the `Offline` leaves it untouched (no field written, no TTL
//! re-armed). The check and the write are one Lua script (`EVALSHA`, in the same pipeline as the
//! other writes, which starts with a `SCRIPT LOAD` of it so a restarted server or a flushed
//! script cache never makes it fail), so they are atomic against other edges' writes.
//!
//! Writes never happen on a shard's hot path. A shard owns a [`SessionSink`] and calls
//! [`SessionSink::try_send`], which never blocks: it pushes a [`SessionOp`] into a bounded
//! crossbeam queue (one per producer) or hands the op back when the queue is full. A single
//! [`SessionWriter`] thread (`iris-sessions`) drains the queues and coalesces the ops per user
//! (the latest state wins; a refresh folds into a pending write), then writes the coalesced
//! state every [`SessionConfig::flush_interval_ms`] or every [`SessionConfig::max_batch`] ops as
//! one pipelined round trip (`HSET` + `EXPIRE` per user, or the `Offline` script). Coalescing
//! gives the same result as writing the ops one by one: an `Offline` that follows a pending
//! `Online` of the same node and region becomes a plain offline write with that location
//! (the `Online` would have taken the record, so the script's check would pass), and an
//! `Offline` from another location than a pending `Online` is dropped (the record it would
//! find is the `Online`'s). Only two `Offline`s from different locations, with no `Online`
//! between them, are approximated: the later one wins. (A writer serves one edge, so all its ops
//! normally share one node and region.)
//!
//! The writer remembers the location of every user it last wrote as online (compactly: the
//! user's name, its shard and an index into a small table of interned node and region names;
//! in practice one entry). Every [`SessionConfig::refresh_interval_secs`] it re-arms the TTL
//! (`EXPIRE`) of each of those users, in pipelined batches; an `EXPIRE` that finds no key (Redis
//! lost it: a restart without persistence, a failover, a `DEL`, an expiry) queues a full
//! rewrite of that user's online record.
//!
//! When Redis is down the writer keeps the coalesced state in memory (one entry per distinct
//! user), reconnects with a backoff of 10 ms doubling to 1 s, counts the errors, logs the first
//! failure and the recovery once each, and writes everything when Redis is back. A connection
//! that sees no round trip for a second is checked with a `PING`, so a restarted server is
//! noticed even while no ops come. Because a server that went away may have come back empty
//! (no persistence) or be a replica that lacks recent writes, every reconnect after a
//! connection error also queues a full rewrite (`HSET` of all fields + `EXPIRE`, as for an
//! `Online`) of every user the writer knows as online, at the location it knows. This resync
//! goes through the same bounded pipelines as the other writes, at most a few per loop turn
//! with the queues drained between them, after the pending writes, so even hundreds of
//! thousands of users never starve the producers. It never overrides newer state: a user with a
//! pending `Online` or `Offline` is skipped (that write follows), and each user's location is
//! read when its batch is built, so one who went offline meanwhile is not resurrected and one
//! who moved shard is written at the new shard. (Like any `Online`, a resync takes the record:
//! a user who is moving to another edge and whose `Offline` here is not written yet may briefly
//! point back here until that `Offline` is written.)
//!
//! [`SessionMetrics`] exposes the counters.
//!
//! [`SessionReader`] is the lookup side for the core (a plain thread where blocking is fine):
//! [`SessionReader::get`] and the pipelined [`SessionReader::get_many`]; it reconnects after a
//! connection error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Select, Sender, TryRecvError, TrySendError};
use redis::{Client, Connection, RedisError, RedisResult, Value};

use crate::error::CoreError;

/// Key prefix of a session hash; the user's bytes follow verbatim.
pub const KEY_PREFIX: &[u8] = b"session:";

/// Initial reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Largest reconnect backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pipelines written per loop turn before the writer goes back to draining its queues (bounds
/// how long the queues go unread while a backlog or a resync is written after an outage).
const CHUNKS_PER_TURN: usize = 8;
/// Idle time after which the writer checks its connection with a `PING` (and, when the
/// connection was lost, tries to reconnect), so that a restarted Redis is noticed and resynced
/// even when no ops come.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The Redis key of `user`'s session: `b"session:"` followed by the user's bytes.
pub fn session_key(user: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(KEY_PREFIX.len() + user.len());
    key.extend_from_slice(KEY_PREFIX);
    key.extend_from_slice(user);
    key
}

/// Settings of the session writer and reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/`. Default `redis://127.0.0.1:6379/`.
    pub url: String,
    /// TTL of a session key, re-armed on every write and refresh. Default 86,400 (24 h).
    pub ttl_secs: u64,
    /// Longest time an op waits in the writer before it is written. Default 5 ms.
    pub flush_interval_ms: u64,
    /// Ops (and users per pipeline) that trigger a write before the interval ends. Default 1024.
    pub max_batch: usize,
    /// Interval between TTL refreshes of every user the writer knows online. Default 3600 s.
    pub refresh_interval_secs: u64,
    /// Capacity of each producer's queue; a full queue makes `try_send` fail. Default 4096.
    pub channel_capacity: usize,
    /// TCP connect (and connection setup) timeout. Default 500 ms.
    pub connect_timeout_ms: u64,
    /// Read and write timeout of a round trip. Default 1000 ms.
    pub io_timeout_ms: u64,
    /// How long `shutdown` keeps trying to write what is pending. Default 2000 ms.
    pub shutdown_timeout_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".to_owned(),
            ttl_secs: 86_400,
            flush_interval_ms: 5,
            max_batch: 1024,
            refresh_interval_secs: 3600,
            channel_capacity: 4096,
            connect_timeout_ms: 500,
            io_timeout_ms: 1000,
            shutdown_timeout_ms: 2000,
        }
    }
}

impl SessionConfig {
    /// The defaults with another URL.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

/// A user's session as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Edge node that holds (or last held) the user's connection.
    pub node: String,
    /// Shard on that node.
    pub shard: u16,
    /// Region of that node.
    pub region: String,
    /// Unix seconds of the logout; 0 while online.
    pub last_seen: u64,
    /// Whether the user is connected.
    pub online: bool,
}

impl SessionRecord {
    /// The nodes of `region` where the user is online (this record holds at most one).
    pub fn online_nodes(&self, region: &str) -> Vec<u32> {
        if !self.online || self.region != region {
            return Vec::new();
        }
        self.node.parse().map(|n| vec![n]).unwrap_or_default()
    }
}

/// A session change sent by a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// The user logged in on `node`/`shard` in `region`.
    Online {
        /// User id bytes.
        user: Vec<u8>,
        /// Edge node id.
        node: String,
        /// Shard on that node.
        shard: u16,
        /// Region of that node.
        region: String,
    },
    /// The user's last session on `node` in `region` ended at `last_seen` (unix seconds). It
    /// marks the record offline only when the record is at this node and region (or has no
    /// location, or does not exist); see the module doc.
    Offline {
        /// User id bytes.
        user: Vec<u8>,
        /// Edge node id of the writer (where the session ended).
        node: String,
        /// Region of that node.
        region: String,
        /// Unix seconds of the logout.
        last_seen: u64,
    },
    /// The user is still connected: re-arm the TTL.
    Refresh {
        /// User id bytes.
        user: Vec<u8>,
    },
}

impl SessionOp {
    /// The user this op is about.
    pub fn user(&self) -> &[u8] {
        match self {
            Self::Online { user, .. } | Self::Offline { user, .. } | Self::Refresh { user } => user,
        }
    }
}

/// Counters of the session writer (all monotonic except `pending_users`).
#[derive(Debug, Default)]
pub struct SessionMetrics {
    /// Ops the writer thread received from its queues.
    pub ops_in: AtomicU64,
    /// Ops handed back by `try_send` because the queue was full (or the writer gone).
    pub rejected: AtomicU64,
    /// Coalesced per-user writes acknowledged by Redis (`HSET`+`EXPIRE`, a lone `EXPIRE` or
    /// the conditional `Offline` script, whether or not it changed the record).
    pub writes: AtomicU64,
    /// TTL refreshes of online users acknowledged by Redis (the periodic sweep), including
    /// those that found the key missing (which then count in `resynced` once rewritten).
    pub refreshes: AtomicU64,
    /// Full rewrites of an online user's record acknowledged by Redis that the writer made on
    /// its own (not counted in `writes`): after a reconnect following a connection error (the
    /// server may have lost its data) and for keys the refresh sweep found missing.
    pub resynced: AtomicU64,
    /// Round trips (pipelines) that succeeded.
    pub pipelines: AtomicU64,
    /// Failed connects, failed round trips and commands Redis refused.
    pub errors: AtomicU64,
    /// Successful connects after a failure.
    pub reconnects: AtomicU64,
    /// Users with a write waiting in memory (a gauge).
    pub pending_users: AtomicU64,
}

/// A plain copy of [`SessionMetrics`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionMetricsSnapshot {
    /// See [`SessionMetrics::ops_in`].
    pub ops_in: u64,
    /// See [`SessionMetrics::rejected`].
    pub rejected: u64,
    /// See [`SessionMetrics::writes`].
    pub writes: u64,
    /// See [`SessionMetrics::refreshes`].
    pub refreshes: u64,
    /// See [`SessionMetrics::resynced`].
    pub resynced: u64,
    /// See [`SessionMetrics::pipelines`].
    pub pipelines: u64,
    /// See [`SessionMetrics::errors`].
    pub errors: u64,
    /// See [`SessionMetrics::reconnects`].
    pub reconnects: u64,
    /// See [`SessionMetrics::pending_users`].
    pub pending_users: u64,
}

impl SessionMetrics {
    /// Reads every counter (each atomically, not all at one instant).
    pub fn snapshot(&self) -> SessionMetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SessionMetricsSnapshot {
            ops_in: r(&self.ops_in),
            rejected: r(&self.rejected),
            writes: r(&self.writes),
            refreshes: r(&self.refreshes),
            resynced: r(&self.resynced),
            pipelines: r(&self.pipelines),
            errors: r(&self.errors),
            reconnects: r(&self.reconnects),
            pending_users: r(&self.pending_users),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A producer's end of the writer's queue (one per shard).
#[derive(Debug)]
pub struct SessionSink {
    tx: Sender<SessionOp>,
    metrics: Arc<SessionMetrics>,
}

impl SessionSink {
    /// Queues `op` for the writer. Never blocks: when the queue is full (or the writer has
    /// stopped) the op comes back as `Err(op)` and the caller decides (retry later, drop a
    /// refresh, ...).
    pub fn try_send(&self, op: SessionOp) -> Result<(), SessionOp> {
        match self.tx.try_send(op) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(op) | TrySendError::Disconnected(op)) => {
                SessionMetrics::add(&self.metrics.rejected, 1);
                Err(op)
            }
        }
    }

    /// The writer's counters.
    pub fn metrics(&self) -> &Arc<SessionMetrics> {
        &self.metrics
    }
}

/// The session writer thread; [`SessionWriter::shutdown`] (or drop) flushes and joins it.
#[derive(Debug)]
pub struct SessionWriter {
    ctl: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<SessionMetrics>,
}

impl SessionWriter {
    /// Starts the writer thread (`iris-sessions`) and returns it with one sink per producer.
    ///
    /// Redis need not be up: the writer connects in the background and keeps ops in memory
    /// until it can write them. Fails only on an unparsable URL or when the thread cannot be
    /// spawned.
    pub fn start(
        cfg: SessionConfig,
        producers: usize,
    ) -> Result<(SessionWriter, Vec<SessionSink>), CoreError> {
        let client = Client::open(cfg.url.as_str())?;
        let metrics = Arc::new(SessionMetrics::default());
        let cap = cfg.channel_capacity.max(1);
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..producers).map(|_| channel::bounded(cap)).unzip();
        let (ctl_tx, ctl_rx) = channel::bounded(1);
        let state = WriterState::new(cfg, client, Arc::clone(&metrics));
        let thread = std::thread::Builder::new()
            .name("iris-sessions".to_owned())
            .spawn(move || state.run(ctl_rx, rxs))?;
        let sinks = txs
            .into_iter()
            .map(|tx| SessionSink {
                tx,
                metrics: Arc::clone(&metrics),
            })
            .collect();
        Ok((
            SessionWriter {
                ctl: Some(ctl_tx),
                thread: Some(thread),
                metrics,
            },
            sinks,
        ))
    }

    /// The writer's counters.
    pub fn metrics(&self) -> &Arc<SessionMetrics> {
        &self.metrics
    }

    /// Drains the queues, writes what is pending (trying for at most
    /// [`SessionConfig::shutdown_timeout_ms`] while Redis is unreachable) and joins the thread.
    pub fn shutdown(mut self) -> Result<(), CoreError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), CoreError> {
        if let Some(ctl) = self.ctl.take() {
            // Full or disconnected both mean the thread already knows (or is gone).
            let _ = ctl.try_send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| CoreError::ThreadPanicked),
            None => Ok(()),
        }
    }
}

impl Drop for SessionWriter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The coalesced write waiting for one user.
#[derive(Debug)]
enum Pending {
    Online {
        node: String,
        shard: u16,
        region: String,
    },
    Offline {
        /// Node and region of the `Offline`.
        node: String,
        region: String,
        last_seen: u64,
        /// The shard of a pending `Online` of this same node and region that this `Offline`
        /// folded in. With it the write is unconditional and complete (`node`, `shard`,
        /// `region`, offline), exactly what that `Online` followed by this `Offline` would have
        /// left; without it the write is the conditional [`OFFLINE_SCRIPT`].
        was_shard: Option<u16>,
    },
    Refresh,
}

/// Folds `op` into the pending state of its user so that writing the result gives what writing
/// the ops one by one would (see the module doc for the one approximation): the latest state
/// wins, a refresh folds into any pending write (which re-arms the TTL anyway).
fn coalesce(pending: &mut HashMap<Vec<u8>, Pending>, op: SessionOp) {
    match op {
        SessionOp::Online {
            user,
            node,
            shard,
            region,
        } => {
            pending.insert(
                user,
                Pending::Online {
                    node,
                    shard,
                    region,
                },
            );
        }
        SessionOp::Offline {
            user,
            node,
            region,
            last_seen,
        } => {
            let was_shard = match pending.remove(&user) {
                Some(Pending::Online {
                    node: n,
                    shard,
                    region: r,
                }) if n == node && r == region => Some(shard),
                Some(Pending::Offline {
                    node: n,
                    region: r,
                    was_shard,
                    ..
                }) if n == node && r == region => was_shard,
                // After a pending `Online` elsewhere the record is that `Online`'s, which this
                // `Offline` would leave untouched; likewise after an `Offline` that carries its
                // `Online`.
                Some(
                    p @ (Pending::Online { .. }
                    | Pending::Offline {
                        was_shard: Some(_), ..
                    }),
                ) => {
                    pending.insert(user, p);
                    return;
                }
                // An `Offline` elsewhere without a location: the later one wins (approximation).
                Some(Pending::Offline { .. } | Pending::Refresh) | None => None,
            };
            pending.insert(
                user,
                Pending::Offline {
                    node,
                    region,
                    last_seen,
                    was_shard,
                },
            );
        }
        SessionOp::Refresh { user } => {
            pending.entry(user).or_insert(Pending::Refresh);
        }
    }
}

/// The conditional `Offline` write. `KEYS[1]`: the session key; `ARGV`: the writer's node and
/// region, `last_seen`, the TTL. Marks the record offline and re-arms its TTL when it is at this
/// node and region, has no node or does not exist (then it creates an offline record without a
/// location) and returns 1; leaves a record held by another node or region untouched and
/// returns 0.
const OFFLINE_SCRIPT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'node', 'region')
local node, region = cur[1], cur[2] or ''
if node and node ~= '' and (node ~= ARGV[1] or region ~= ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[3], 'online', 0)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Whether writing `p` runs [`OFFLINE_SCRIPT`].
fn needs_script(p: &Pending) -> bool {
    matches!(
        p,
        Pending::Offline {
            was_shard: None,
            ..
        }
    )
}

/// Appends the commands for one user's pending write; returns how many commands it added.
/// `script_sha` is the SHA1 of [`OFFLINE_SCRIPT`] once known (`EVALSHA`; the pipeline loads the
/// script first), else the script goes in full (`EVAL`).
fn push_write(
    pipe: &mut redis::Pipeline,
    key: &[u8],
    p: &Pending,
    ttl: u64,
    script_sha: Option<&str>,
) -> usize {
    match p {
        Pending::Online {
            node,
            shard,
            region,
        } => push_record(pipe, key, node, *shard, region, None, ttl),
        Pending::Offline {
            node,
            region,
            last_seen,
            was_shard: Some(shard),
        } => push_record(pipe, key, node, *shard, region, Some(*last_seen), ttl),
        Pending::Offline {
            node,
            region,
            last_seen,
            was_shard: None,
        } => {
            match script_sha {
                Some(sha) => pipe.cmd("EVALSHA").arg(sha),
                None => pipe.cmd("EVAL").arg(OFFLINE_SCRIPT),
            }
            .arg(1u8)
            .arg(key)
            .arg(node.as_str())
            .arg(region.as_str())
            .arg(*last_seen)
            .arg(ttl);
            1
        }
        Pending::Refresh => {
            pipe.cmd("EXPIRE").arg(key).arg(ttl);
            1
        }
    }
}

/// Appends the unconditional write of a complete record (`HSET` of every field, then `EXPIRE`):
/// online, or offline since `offline_since` (unix seconds). Returns the command count, 2.
fn push_record(
    pipe: &mut redis::Pipeline,
    key: &[u8],
    node: &str,
    shard: u16,
    region: &str,
    offline_since: Option<u64>,
    ttl: u64,
) -> usize {
    pipe.cmd("HSET")
        .arg(key)
        .arg("node")
        .arg(node)
        .arg("shard")
        .arg(shard)
        .arg("region")
        .arg(region)
        .arg("last_seen")
        .arg(offline_since.unwrap_or(0))
        .arg("online")
        .arg(u8::from(offline_since.is_none()));
    pipe.cmd("EXPIRE").arg(key).arg(ttl);
    2
}

/// True for errors after which the connection cannot be trusted (I/O, timeouts, a dropped or
/// refused connection); false for a command the server refused.
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn connect(
    client: &Client,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(connect_timeout)?;
    conn.set_read_timeout(Some(io_timeout))?;
    conn.set_write_timeout(Some(io_timeout))?;
    Ok(conn)
}

/// Where an online user is: its shard and an index into [`Places`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    place: u32,
    shard: u16,
}

/// One interned node and region, with how many online users are there.
#[derive(Debug)]
struct Place {
    node: String,
    region: String,
    users: usize,
}

/// The interned (node, region) pairs of the online users. A writer serves one edge, so there is
/// normally a single entry; a pair no user is at any more is freed and its slot reused, so the
/// table never outgrows the distinct locations in use.
#[derive(Debug, Default)]
struct Places {
    slots: Vec<Place>,
    ids: HashMap<(String, String), u32>,
    free: Vec<u32>,
    /// The last interned id: the lookup of the usual (only) pair without building a key.
    last: Option<u32>,
}

impl Places {
    /// The id of (`node`, `region`), interned if new, with one more user counted there.
    fn acquire(&mut self, node: &str, region: &str) -> u32 {
        let id = match self.last {
            Some(id)
                if self.slots[id as usize].node == node
                    && self.slots[id as usize].region == region =>
            {
                id
            }
            _ => self.lookup_or_insert(node, region),
        };
        self.slots[id as usize].users += 1;
        self.last = Some(id);
        id
    }

    fn lookup_or_insert(&mut self, node: &str, region: &str) -> u32 {
        let key = (node.to_owned(), region.to_owned());
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let place = Place {
            node: key.0.clone(),
            region: key.1.clone(),
            users: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = place;
                id
            }
            None => {
                // More than 4 billion distinct locations in use is not a real configuration.
                let id = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(place);
                id
            }
        };
        self.ids.insert(key, id);
        id
    }

    /// One user fewer at `id`; the slot is freed when none is left.
    fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        slot.users = slot.users.saturating_sub(1);
        if slot.users == 0 {
            let key = (
                std::mem::take(&mut slot.node),
                std::mem::take(&mut slot.region),
            );
            self.ids.remove(&key);
            self.free.push(id);
            if self.last == Some(id) {
                self.last = None;
            }
        }
    }

    fn get(&self, id: u32) -> (&str, &str) {
        let p = &self.slots[id as usize];
        (&p.node, &p.region)
    }
}

/// The users the writer last wrote as online, with their location (for the refresh sweep and
/// the resync after a reconnect).
#[derive(Debug, Default)]
struct OnlineUsers {
    users: HashMap<Vec<u8>, Loc>,
    places: Places,
}

impl OnlineUsers {
    fn set_online(&mut self, user: Vec<u8>, node: &str, shard: u16, region: &str) {
        let loc = Loc {
            place: self.places.acquire(node, region),
            shard,
        };
        if let Some(old) = self.users.insert(user, loc) {
            self.places.release(old.place);
        }
    }

    fn set_offline(&mut self, user: &[u8]) {
        if let Some(old) = self.users.remove(user) {
            self.places.release(old.place);
        }
    }

    /// `user`'s node, shard and region when it is online.
    fn get(&self, user: &[u8]) -> Option<(&str, u16, &str)> {
        let loc = self.users.get(user)?;
        let (node, region) = self.places.get(loc.place);
        Some((node, loc.shard, region))
    }

    fn names(&self) -> Vec<Vec<u8>> {
        self.users.keys().cloned().collect()
    }

    fn len(&self) -> usize {
        self.users.len()
    }
}

/// Everything the writer thread owns.
struct WriterState {
    cfg: SessionConfig,
    client: Client,
    metrics: Arc<SessionMetrics>,
    conn: Option<Connection>,
    /// Whether a connection ever succeeded (later successes count as reconnects).
    connected_once: bool,
    /// Earliest time of the next connect attempt while disconnected.
    next_attempt: Instant,
    backoff: Duration,
    /// In an outage (first failure logged, recovery not yet).
    failing: bool,
    /// Errors counted since the outage began (for the recovery log).
    outage_errors: u64,
    pending: HashMap<Vec<u8>, Pending>,
    /// When the oldest pending op arrived.
    first_pending: Option<Instant>,
    /// Ops received since the last completed flush.
    ops_since_flush: usize,
    /// Users whose last write was `online`, with their location.
    online: OnlineUsers,
    next_refresh: Instant,
    /// Users still to refresh in the current sweep.
    refresh_queue: Vec<Vec<u8>>,
    /// Online users whose record is to be rewritten in full (after a reconnect, or when the
    /// refresh sweep found the key missing); taken from the end, batch by batch.
    resync_queue: Vec<Vec<u8>>,
    /// Last time Redis answered (for the idle connection check).
    last_io: Instant,
    pipe: redis::Pipeline,
    /// SHA1 of [`OFFLINE_SCRIPT`], learnt from the reply to its first `SCRIPT LOAD`.
    script_sha: Option<String>,
}

impl WriterState {
    fn new(cfg: SessionConfig, client: Client, metrics: Arc<SessionMetrics>) -> Self {
        let now = Instant::now();
        let next_refresh = now + Duration::from_secs(cfg.refresh_interval_secs.max(1));
        Self {
            cfg,
            client,
            metrics,
            conn: None,
            connected_once: false,
            next_attempt: now,
            backoff: BACKOFF_MIN,
            failing: false,
            outage_errors: 0,
            pending: HashMap::new(),
            first_pending: None,
            ops_since_flush: 0,
            online: OnlineUsers::default(),
            next_refresh,
            refresh_queue: Vec::new(),
            resync_queue: Vec::new(),
            last_io: now,
            pipe: redis::pipe(),
            script_sha: None,
        }
    }

    fn max_batch(&self) -> usize {
        self.cfg.max_batch.max(1)
    }

    fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.cfg.flush_interval_ms)
    }

    fn run(mut self, ctl: Receiver<()>, rxs: Vec<Receiver<SessionOp>>) {
        let mut sel = Select::new();
        let ctl_idx = sel.recv(&ctl);
        // Select index -> producer queue index.
        let mut by_idx: HashMap<usize, usize> = HashMap::new();
        for (i, rx) in rxs.iter().enumerate() {
            by_idx.insert(sel.recv(rx), i);
        }
        let mut live: Vec<bool> = vec![true; rxs.len()];
        let mut shutdown_deadline: Option<Instant> = None;

        loop {
            let deadline = self.next_deadline(shutdown_deadline);
            match sel.ready_deadline(deadline) {
                Ok(idx) if idx == ctl_idx => {
                    if shutdown_deadline.is_none() {
                        let wait = Duration::from_millis(self.cfg.shutdown_timeout_ms);
                        shutdown_deadline = Some(Instant::now() + wait);
                    }
                    // Stop selecting on it: a disconnected receiver is always ready.
                    sel.remove(ctl_idx);
                }
                Ok(_) | Err(_) => {}
            }
            self.drain(&rxs, &mut live, &mut sel, &by_idx);

            let now = Instant::now();
            if let Some(end) = shutdown_deadline {
                if self.pending.is_empty() || now >= end {
                    if !self.pending.is_empty() {
                        // One last try, so a Redis that is up gets everything.
                        self.flush(usize::MAX);
                    }
                    break;
                }
                self.flush(usize::MAX);
                continue;
            }
            let mut used = 0;
            if self.flush_due(now) {
                used = self.flush(CHUNKS_PER_TURN);
            }
            if now >= self.next_refresh {
                self.next_refresh =
                    now + Duration::from_secs(self.cfg.refresh_interval_secs.max(1));
                if self.refresh_queue.is_empty() {
                    self.refresh_queue = self.online.names();
                }
            }
            if !self.refresh_queue.is_empty() && self.may_attempt(now) {
                self.refresh_chunk();
                used += 1;
            }
            if !self.resync_queue.is_empty() && self.may_attempt(now) {
                // After the pending writes (newer), in what is left of this turn's pipelines.
                self.resync_chunks(CHUNKS_PER_TURN.saturating_sub(used).max(1));
            }
            if self.connected_once && now >= self.last_io + IDLE_CHECK && self.may_attempt(now) {
                self.check_idle_conn();
            }
        }

        if !self.pending.is_empty() {
            tracing::warn!(
                pending_users = self.pending.len(),
                "session writer stopped with unwritten sessions"
            );
        }
        tracing::debug!(
            ops_in = self.metrics.ops_in.load(Ordering::Relaxed),
            writes = self.metrics.writes.load(Ordering::Relaxed),
            "session writer stopped"
        );
    }

    /// When the loop must wake next even without new ops.
    fn next_deadline(&self, shutdown: Option<Instant>) -> Instant {
        let now = Instant::now();
        if let Some(end) = shutdown {
            // While shutting down: retry as the backoff allows, never past the deadline.
            return if self.conn.is_some() {
                now
            } else {
                self.next_attempt.min(end)
            };
        }
        let mut d = self.next_refresh;
        if let Some(first) = self.first_pending {
            let mut due = if self.ops_since_flush >= self.max_batch() {
                now
            } else {
                first + self.flush_interval()
            };
            if self.conn.is_none() {
                due = due.max(self.next_attempt);
            }
            d = d.min(due);
        }
        if !self.refresh_queue.is_empty() || !self.resync_queue.is_empty() {
            d = d.min(if self.conn.is_none() {
                self.next_attempt
            } else {
                now
            });
        }
        if self.connected_once {
            let mut check = self.last_io + IDLE_CHECK;
            if self.conn.is_none() {
                check = check.max(self.next_attempt);
            }
            d = d.min(check);
        }
        d
    }

    fn may_attempt(&self, now: Instant) -> bool {
        self.conn.is_some() || now >= self.next_attempt
    }

    fn flush_due(&self, now: Instant) -> bool {
        match self.first_pending {
            None => false,
            Some(first) => {
                (self.ops_since_flush >= self.max_batch() || now >= first + self.flush_interval())
                    && self.may_attempt(now)
            }
        }
    }

    /// Moves queued ops into the pending map (at most a few batches per call so writes keep
    /// their pace under sustained load).
    fn drain(
        &mut self,
        rxs: &[Receiver<SessionOp>],
        live: &mut [bool],
        sel: &mut Select<'_>,
        by_idx: &HashMap<usize, usize>,
    ) {
        let limit = self.max_batch().saturating_mul(4);
        let mut n = 0usize;
        let mut progress = true;
        while progress && n < limit {
            progress = false;
            for (i, rx) in rxs.iter().enumerate() {
                if !live[i] {
                    continue;
                }
                // Up to a batch from each queue per sweep, so no producer starves the others.
                for _ in 0..self.max_batch() {
                    match rx.try_recv() {
                        Ok(op) => {
                            coalesce(&mut self.pending, op);
                            n += 1;
                            progress = true;
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            live[i] = false;
                            if let Some((&idx, _)) = by_idx.iter().find(|(_, &q)| q == i) {
                                sel.remove(idx);
                            }
                            break;
                        }
                    }
                }
            }
        }
        if n > 0 {
            SessionMetrics::add(&self.metrics.ops_in, n as u64);
            self.ops_since_flush += n;
            if self.first_pending.is_none() {
                self.first_pending = Some(Instant::now());
            }
            self.update_pending_gauge();
        }
    }

    fn update_pending_gauge(&self) {
        self.metrics
            .pending_users
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Returns a connection, connecting if the backoff allows.
    fn ensure_conn(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let connect_timeout = Duration::from_millis(self.cfg.connect_timeout_ms.max(1));
        let io_timeout = Duration::from_millis(self.cfg.io_timeout_ms.max(1));
        match connect(&self.client, connect_timeout, io_timeout) {
            Ok(c) => {
                if self.connected_once {
                    SessionMetrics::add(&self.metrics.reconnects, 1);
                    self.queue_resync();
                }
                self.connected_once = true;
                self.conn = Some(c);
                true
            }
            Err(e) => {
                self.on_failure(&e, "connect");
                false
            }
        }
    }

    /// Counts a connection-level failure, logs the first of an outage, drops the connection
    /// and arms the backoff.
    fn on_failure(&mut self, e: &RedisError, during: &'static str) {
        SessionMetrics::add(&self.metrics.errors, 1);
        self.outage_errors += 1;
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                error = %e,
                during,
                pending_users = self.pending.len(),
                "redis session writes failing, keeping sessions in memory"
            );
        }
        self.conn = None;
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// After a reconnect: the server may have lost every session (restart without persistence,
    /// failover to a replica behind), so every online user is to be rewritten in full. Replaces
    /// a resync still in progress (it starts over with everyone).
    fn queue_resync(&mut self) {
        self.resync_queue = self.online.names();
        if !self.resync_queue.is_empty() {
            tracing::debug!(
                users = self.resync_queue.len(),
                "reconnected to redis, rewriting online sessions"
            );
        }
    }

    /// Nothing was written for a while: checks the connection with a `PING`, or reconnects
    /// (which queues the resync) when it was lost.
    fn check_idle_conn(&mut self) {
        if !self.ensure_conn() {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match redis::cmd("PING").query::<Value>(conn) {
            Err(e) if is_connection_error(&e) => self.on_failure(&e, "ping"),
            // Any answer (even an error such as `LOADING`) shows the connection works.
            _ => self.on_alive(),
        }
    }

    /// A round trip succeeded: count it, reset the backoff and log the recovery once.
    fn on_success(&mut self) {
        SessionMetrics::add(&self.metrics.pipelines, 1);
        self.on_alive();
    }

    /// Redis answered: reset the backoff and log the recovery once.
    fn on_alive(&mut self) {
        self.last_io = Instant::now();
        self.backoff = BACKOFF_MIN;
        if self.failing {
            self.failing = false;
            tracing::info!(
                errors = self.outage_errors,
                pending_users = self.pending.len(),
                "redis session writes recovered"
            );
            self.outage_errors = 0;
        }
    }

    /// Runs the pipeline in `self.pipe`; `Ok` holds one result per command. The caller
    /// handles a failure (after putting its work back, so the log shows the full backlog).
    fn round_trip(&mut self) -> Option<RedisResult<Vec<RedisResult<Value>>>> {
        let conn = self.conn.as_mut()?;
        let r = self
            .pipe
            .ignore_errors()
            .query::<Vec<RedisResult<Value>>>(conn);
        if r.is_ok() {
            self.on_success();
        }
        Some(r)
    }

    /// Counts and logs commands Redis refused (wrong type, out of memory, ...). They are not
    /// retried: the next state change or refresh of that user writes it again.
    fn count_refused(&mut self, results: &[RedisResult<Value>]) -> usize {
        let mut refused = 0usize;
        for r in results {
            if let Err(e) = r {
                if refused == 0 {
                    tracing::warn!(error = %e, "redis refused a session command");
                }
                refused += 1;
            }
        }
        SessionMetrics::add(&self.metrics.errors, refused as u64);
        refused
    }

    /// Writes pending users in pipelines of up to `max_batch` users, at most `max_chunks`
    /// pipelines. Stops at the first failure (the chunk goes back to pending). Returns the
    /// pipelines written.
    fn flush(&mut self, max_chunks: usize) -> usize {
        let ttl = self.cfg.ttl_secs;
        let batch = self.max_batch();
        let mut chunks = 0usize;
        while !self.pending.is_empty() && chunks < max_chunks {
            if !self.ensure_conn() {
                break;
            }
            let keys: Vec<Vec<u8>> = self.pending.keys().take(batch).cloned().collect();
            let mut chunk: Vec<(Vec<u8>, Pending)> = Vec::with_capacity(keys.len());
            for k in keys {
                if let Some(p) = self.pending.remove(&k) {
                    chunk.push((k, p));
                }
            }
            self.pipe.clear();
            let script = chunk.iter().any(|(_, p)| needs_script(p));
            if script {
                // Loaded ahead of its `EVALSHA`s in the same round trip, so a restarted server
                // or a flushed script cache cannot fail them; the reply is the SHA1.
                self.pipe.cmd("SCRIPT").arg("LOAD").arg(OFFLINE_SCRIPT);
            }
            // Index of each user's first reply.
            let mut first_reply = Vec::with_capacity(chunk.len());
            let mut replies = usize::from(script);
            let mut key = Vec::new();
            for (user, p) in &chunk {
                key.clear();
                key.extend_from_slice(KEY_PREFIX);
                key.extend_from_slice(user);
                first_reply.push(replies);
                replies += push_write(&mut self.pipe, &key, p, ttl, self.script_sha.as_deref());
            }
            match self.round_trip() {
                Some(Ok(results)) => {
                    self.count_refused(&results);
                    if script && self.script_sha.is_none() {
                        self.script_sha = match results.first() {
                            Some(Ok(Value::BulkString(sha))) => String::from_utf8(sha.clone()).ok(),
                            Some(Ok(Value::SimpleString(sha))) => Some(sha.clone()),
                            _ => None,
                        };
                    }
                    let written = chunk.len() as u64;
                    let mut left = 0u64;
                    for ((user, p), at) in chunk.into_iter().zip(first_reply) {
                        match p {
                            Pending::Online {
                                node,
                                shard,
                                region,
                            } => {
                                self.online.set_online(user, &node, shard, &region);
                            }
                            Pending::Offline { was_shard, .. } => {
                                if was_shard.is_none()
                                    && matches!(results.get(at), Some(Ok(Value::Int(0))))
                                {
                                    left += 1;
                                }
                                // Online elsewhere or not at all: either way not this
                                // writer's to refresh.
                                self.online.set_offline(&user);
                            }
                            Pending::Refresh => {}
                        }
                    }
                    if left > 0 {
                        tracing::debug!(
                            users = left,
                            "offline writes left sessions held by another node untouched"
                        );
                    }
                    SessionMetrics::add(&self.metrics.writes, written);
                    chunks += 1;
                }
                Some(Err(e)) => {
                    // Nothing newer can have arrived meanwhile (this thread is the only
                    // consumer), so the chunk goes back as it was.
                    self.pending.extend(chunk);
                    self.on_failure(&e, "write");
                    break;
                }
                None => {
                    self.pending.extend(chunk);
                    break;
                }
            }
        }
        if self.pending.is_empty() {
            self.first_pending = None;
            self.ops_since_flush = 0;
        } else if chunks > 0 {
            self.ops_since_flush = self.ops_since_flush.min(self.pending.len());
        }
        self.update_pending_gauge();
        chunks
    }

    /// Re-arms the TTL of one batch of the current refresh sweep.
    fn refresh_chunk(&mut self) {
        if !self.ensure_conn() {
            return;
        }
        let n = self.refresh_queue.len().min(self.max_batch());
        let start = self.refresh_queue.len() - n;
        self.pipe.clear();
        let ttl = self.cfg.ttl_secs;
        let mut key = Vec::new();
        for user in &self.refresh_queue[start..] {
            key.clear();
            key.extend_from_slice(KEY_PREFIX);
            key.extend_from_slice(user);
            self.pipe.cmd("EXPIRE").arg(key.as_slice()).arg(ttl);
        }
        match self.round_trip() {
            Some(Ok(results)) => {
                self.count_refused(&results);
                // `EXPIRE` answers 0 when there is no key: Redis lost this online user's record.
                let before = self.resync_queue.len();
                for (user, r) in self.refresh_queue.drain(start..).zip(&results) {
                    if matches!(r, Ok(Value::Int(0))) {
                        self.resync_queue.push(user);
                    }
                }
                let missing = self.resync_queue.len() - before;
                if missing > 0 {
                    tracing::debug!(
                        users = missing,
                        "refresh found sessions missing in redis, rewriting them"
                    );
                }
                SessionMetrics::add(&self.metrics.refreshes, n as u64);
            }
            Some(Err(e)) => self.on_failure(&e, "refresh"),
            None => {}
        }
    }

    /// Rewrites, in full, up to `max_chunks` batches of the users in the resync queue that are
    /// still online here and have no newer write pending. Stops at the first failure (the batch
    /// stays queued; the reconnect queues everyone anyway).
    fn resync_chunks(&mut self, max_chunks: usize) {
        let ttl = self.cfg.ttl_secs;
        let batch = self.max_batch();
        let mut chunks = 0usize;
        let mut key = Vec::new();
        while !self.resync_queue.is_empty() && chunks < max_chunks {
            if !self.ensure_conn() {
                break;
            }
            let n = self.resync_queue.len().min(batch);
            let start = self.resync_queue.len() - n;
            self.pipe.clear();
            let mut users = 0u64;
            for user in &self.resync_queue[start..] {
                // A pending `Online` or `Offline` is newer and is written anyway (a pending
                // refresh is only an `EXPIRE`, which a lost key needs this write for).
                if matches!(
                    self.pending.get(user),
                    Some(Pending::Online { .. } | Pending::Offline { .. })
                ) {
                    continue;
                }
                // Written offline since it was queued: nothing to restore.
                let Some((node, shard, region)) = self.online.get(user) else {
                    continue;
                };
                key.clear();
                key.extend_from_slice(KEY_PREFIX);
                key.extend_from_slice(user);
                push_record(&mut self.pipe, &key, node, shard, region, None, ttl);
                users += 1;
            }
            if users == 0 {
                self.resync_queue.truncate(start);
                continue;
            }
            match self.round_trip() {
                Some(Ok(results)) => {
                    self.count_refused(&results);
                    self.resync_queue.truncate(start);
                    SessionMetrics::add(&self.metrics.resynced, users);
                    chunks += 1;
                }
                Some(Err(e)) => {
                    self.on_failure(&e, "resync");
                    break;
                }
                None => break,
            }
        }
        if self.resync_queue.is_empty() && chunks > 0 {
            tracing::debug!(
                resynced = self.metrics.resynced.load(Ordering::Relaxed),
                online = self.online.len(),
                "session resync done"
            );
        }
    }
}

/// Looks sessions up (blocking; for the core's own threads, never a shard).
pub struct SessionReader {
    client: Client,
    conn: Mutex<Option<Connection>>,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl std::fmt::Debug for SessionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReader")
            .field("addr", &self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl SessionReader {
    /// A reader for `cfg.url`; it connects on first use and again after a connection error.
    pub fn new(cfg: &SessionConfig) -> Result<Self, CoreError> {
        Ok(Self {
            client: Client::open(cfg.url.as_str())?,
            conn: Mutex::new(None),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms.max(1)),
            io_timeout: Duration::from_millis(cfg.io_timeout_ms.max(1)),
        })
    }

    /// `user`'s session, or `None` when there is none (never written or expired).
    pub fn get(&self, user: &[u8]) -> Result<Option<SessionRecord>, CoreError> {
        let mut v = self.get_many(&[user])?;
        Ok(v.pop().flatten())
    }

    /// The sessions of `users`, in order, in one pipelined round trip.
    pub fn get_many<U: AsRef<[u8]>>(
        &self,
        users: &[U],
    ) -> Result<Vec<Option<SessionRecord>>, CoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HGETALL").arg(session_key(u.as_ref()));
        }
        let maps: Vec<HashMap<Vec<u8>, Vec<u8>>> = self.query(&pipe)?;
        if maps.len() != users.len() {
            return Err(CoreError::corrupt(
                "session reply",
                format!("{} replies for {} users", maps.len(), users.len()),
            ));
        }
        maps.iter().map(parse_record).collect()
    }

    /// Runs `pipe`, reconnecting and retrying once after a connection error.
    fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, CoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut last_err = None;
        for _ in 0..2 {
            if guard.is_none() {
                match connect(&self.client, self.connect_timeout, self.io_timeout) {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        last_err = Some(e);
                        continue;
                    }
                }
            }
            let Some(conn) = guard.as_mut() else { continue };
            match pipe.query::<T>(conn) {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    *guard = None;
                    last_err = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        match last_err {
            Some(e) => Err(e.into()),
            None => Err(CoreError::corrupt("session reader", "no attempt made")),
        }
    }
}

/// Decodes a session hash; an empty hash (missing key) is `None`. Fields a partial record
/// lacks (an `Offline` that found no record) read as empty / zero.
fn parse_record(map: &HashMap<Vec<u8>, Vec<u8>>) -> Result<Option<SessionRecord>, CoreError> {
    if map.is_empty() {
        return Ok(None);
    }
    let text = |field: &str| -> Result<String, CoreError> {
        match map.get(field.as_bytes()) {
            None => Ok(String::new()),
            Some(v) => String::from_utf8(v.clone())
                .map_err(|_| CoreError::corrupt("session record", format!("{field} not utf-8"))),
        }
    };
    let num = |field: &str| -> Result<u64, CoreError> {
        match map.get(field.as_bytes()) {
            None => Ok(0),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    CoreError::corrupt("session record", format!("{field} not a number"))
                }),
        }
    };
    let shard = u16::try_from(num("shard")?)
        .map_err(|_| CoreError::corrupt("session record", "shard out of range"))?;
    Ok(Some(SessionRecord {
        node: text("node")?,
        shard,
        region: text("region")?,
        last_seen: num("last_seen")?,
        online: num("online")? != 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_binary_safe() {
        assert_eq!(session_key(b"a:\xff\x00"), b"session:a:\xff\x00".to_vec());
    }

    fn online(u: &[u8], node: &str, shard: u16) -> SessionOp {
        SessionOp::Online {
            user: u.to_vec(),
            node: node.into(),
            shard,
            region: "eu".into(),
        }
    }

    fn offline(u: &[u8], node: &str, last_seen: u64) -> SessionOp {
        SessionOp::Offline {
            user: u.to_vec(),
            node: node.into(),
            region: "eu".into(),
            last_seen,
        }
    }

    #[test]
    fn coalescing_keeps_latest_and_location() {
        let mut p = HashMap::new();
        let u = b"u".to_vec();
        coalesce(&mut p, SessionOp::Refresh { user: u.clone() });
        assert!(matches!(p[&u], Pending::Refresh));
        coalesce(&mut p, online(&u, "n1", 3));
        coalesce(&mut p, SessionOp::Refresh { user: u.clone() });
        assert!(matches!(p[&u], Pending::Online { shard: 3, .. }));
        coalesce(&mut p, offline(&u, "n1", 42));
        match &p[&u] {
            Pending::Offline {
                node,
                last_seen,
                was_shard,
                ..
            } => {
                assert_eq!((node.as_str(), *last_seen, *was_shard), ("n1", 42, Some(3)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            !needs_script(&p[&u]),
            "a folded online makes it unconditional"
        );
        // A later offline of the same location keeps the folded location.
        coalesce(&mut p, offline(&u, "n1", 43));
        assert!(matches!(
            p[&u],
            Pending::Offline {
                last_seen: 43,
                was_shard: Some(3),
                ..
            }
        ));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn coalescing_offline_from_elsewhere() {
        let mut p = HashMap::new();
        let u = b"u".to_vec();
        // A pending online at n2 is what the record would hold: n1's offline changes nothing.
        coalesce(&mut p, online(&u, "n2", 5));
        coalesce(&mut p, offline(&u, "n1", 7));
        assert!(matches!(&p[&u], Pending::Online { node, shard: 5, .. } if node == "n2"));
        // Same region check: another region with the same node id is elsewhere too.
        coalesce(
            &mut p,
            SessionOp::Offline {
                user: u.clone(),
                node: "n2".into(),
                region: "us".into(),
                last_seen: 8,
            },
        );
        assert!(matches!(&p[&u], Pending::Online { node, .. } if node == "n2"));
        // An offline carrying its online is kept against an offline from elsewhere.
        coalesce(&mut p, offline(&u, "n2", 9));
        coalesce(&mut p, offline(&u, "n1", 10));
        assert!(matches!(
            &p[&u],
            Pending::Offline { node, last_seen: 9, was_shard: Some(5), .. } if node == "n2"
        ));
        // Without a known location the write is the conditional script.
        let v = b"v".to_vec();
        coalesce(&mut p, offline(&v, "n1", 11));
        assert!(needs_script(&p[&v]));
        coalesce(&mut p, offline(&v, "n2", 12));
        assert!(matches!(
            &p[&v],
            Pending::Offline { node, last_seen: 12, was_shard: None, .. } if node == "n2"
        ));
    }

    #[test]
    fn online_users_intern_locations() {
        let mut o = OnlineUsers::default();
        for i in 0..100u16 {
            o.set_online(format!("u{i}").into_bytes(), "edge-1", i, "eu");
        }
        assert_eq!(o.places.slots.len(), 1, "one location interned once");
        assert_eq!(o.get(b"u7"), Some(("edge-1", 7, "eu")));
        // Moving a user (same name again) replaces its location.
        o.set_online(b"u7".to_vec(), "edge-2", 9, "eu");
        assert_eq!(o.get(b"u7"), Some(("edge-2", 9, "eu")));
        assert_eq!(o.len(), 100);
        assert_eq!(o.places.slots[0].users, 99);
        // The same node in another region is another location.
        o.set_online(b"u8".to_vec(), "edge-2", 1, "us");
        assert_eq!(o.get(b"u8"), Some(("edge-2", 1, "us")));
        assert_eq!(o.places.ids.len(), 3);
        // A location nobody is at any more is freed and its slot reused.
        o.set_offline(b"u7");
        o.set_offline(b"u7");
        assert_eq!(o.get(b"u7"), None);
        assert_eq!(o.places.ids.len(), 2);
        o.set_online(b"u7".to_vec(), "edge-3", 2, "eu");
        assert_eq!(o.places.slots.len(), 3, "freed slot reused");
        assert_eq!(o.get(b"u7"), Some(("edge-3", 2, "eu")));
        assert_eq!(o.get(b"u8"), Some(("edge-2", 1, "us")));
        assert_eq!(o.get(b"u1"), Some(("edge-1", 1, "eu")));
        for i in 0..100u16 {
            o.set_offline(format!("u{i}").as_bytes());
        }
        assert_eq!(o.len(), 0);
        assert!(o.places.ids.is_empty());
        assert!(o.places.slots.iter().all(|p| p.users == 0));
    }

    #[test]
    fn full_record_write_commands() {
        let mut pipe = redis::pipe();
        assert_eq!(push_record(&mut pipe, b"k", "n", 3, "r", None, 60), 2);
        assert_eq!(push_record(&mut pipe, b"k", "n", 3, "r", Some(0), 60), 2);
        let cmds: Vec<Vec<u8>> = pipe.cmd_iter().map(|c| c.get_packed_command()).collect();
        let text = |c: &[u8]| String::from_utf8_lossy(c).replace("\r\n", " ");
        assert!(text(&cmds[0]).contains("online $1 1"), "{}", text(&cmds[0]));
        assert!(
            text(&cmds[1]).starts_with("*3 $6 EXPIRE"),
            "{}",
            text(&cmds[1])
        );
        // An offline record is offline even with a zero `last_seen`.
        assert!(text(&cmds[2]).contains("online $1 0"), "{}", text(&cmds[2]));
    }

    #[test]
    fn parse_partial_and_bad_records() {
        let mut m = HashMap::new();
        assert_eq!(parse_record(&m).unwrap(), None);
        m.insert(b"last_seen".to_vec(), b"7".to_vec());
        m.insert(b"online".to_vec(), b"0".to_vec());
        let r = parse_record(&m).unwrap().unwrap();
        assert_eq!((r.last_seen, r.online, r.shard), (7, false, 0));
        m.insert(b"shard".to_vec(), b"70000".to_vec());
        assert!(parse_record(&m).is_err());
    }
}
