//! Sessions in Redis: on which edges of a region each user is connected.
//!
//! Every user with a session has a Redis hash at `session:{user}` (the user's bytes appended
//! verbatim to `b"session:"`, so names may hold `:` or non-UTF-8 bytes) with **one field per edge
//! node holding the user**, `@{region}/{node}` = `{run}/{shard}/{login_ms}` (the run of that
//! edge process, the shard, the Unix ms of the login), and `last_seen` (Unix seconds of the
//! latest logout; absent if none). A user is online while it has a live node field; a user
//! logged in on two edges (two devices) has two fields and gets live messages on both
//! ([`SessionRecord::online_nodes`]). The key carries a TTL ([`SessionConfig::ttl_secs`], 24 h
//! by default) that is refreshed while the user stays connected.
//!
//! **Runs and exact ownership.** Each edge process has a run id (its start, Unix ms, which is
//! also the time of the `EdgeReset` it announces), carried by every write it makes. The region's
//! run table, the hash `session-runs` (field `{region}/{node}` = the newest run of that node),
//! is raised by every `Online` write and by [`SessionOp::Announce`] (sent when the edge reads its
//! own reset back from the presence topic). Every write only touches the field of its own node,
//! and only when its run is not older than what is there:
//! - [`SessionOp::Online`] sets its node's field (unless that node already runs a newer run);
//! - [`SessionOp::Offline`] deletes its node's field if the field's run is not newer than its
//!   own, and raises `last_seen`;
//! - the resync after a Redis reconnect (and of keys the refresh sweep found missing) is an
//!   `Online` of the writer's own node and run.
//!
//! So a user who hopped from edge A to edge B is never pointed back at A by A's late writes: A
//! only ever writes A's field, B's field stays. A field left by a dead run (the edge was killed)
//! is ignored by readers once the run table holds a newer run of that node, and deleted by the
//! next `Online` write to the same key. Each check and write is one Lua script (`EVALSHA`, in
//! the same pipeline as the other writes, which starts with a `SCRIPT LOAD` of the scripts it
//! uses, so a restarted server or a flushed script cache never makes it fail), atomic against
//! other edges' writes. (The `Online` script reads the run table, a second key: under Redis
//! Cluster both keys would need one hash slot.)
//!
//! Records of the earlier one-node layout (`node`, `shard`, `region`, `online` fields, written
//! by edges before this version) are still read, as one session of an unknown run; an `Online`
//! write replaces them and an `Offline` of that node removes them.
//!
//! Writes never happen on a shard's hot path. A shard owns a [`SessionSink`] and calls
//! [`SessionSink::try_send`], which never blocks: it pushes a [`SessionOp`] into a bounded
//! crossbeam queue (one per producer) or hands the op back when the queue is full. A single
//! [`SessionWriter`] thread (`iris-sessions`) drains the queues and coalesces the ops per user
//! and node (the latest state wins; writes of an older run than one pending are dropped, as the
//! scripts would ignore them), then writes the coalesced state every
//! [`SessionConfig::flush_interval_ms`] or every [`SessionConfig::max_batch`] ops as one
//! pipelined round trip. Since every op touches only its own node's field, coalescing gives
//! exactly the result of writing the ops one by one.
//!
//! The writer remembers the location of every user it last wrote as online (compactly: the
//! user's name, its shard, login time and an index into a small table of interned node, region
//! and run; in practice one entry). Every [`SessionConfig::refresh_interval_secs`] it re-arms
//! the TTL (`EXPIRE`) of each of those users, in pipelined batches; an `EXPIRE` that finds no
//! key (Redis lost it: a restart without persistence, a failover, a `DEL`, an expiry) queues a
//! rewrite of that user's field. (A writer serving several nodes, which only tests do, tracks
//! one location per user: the last written.)
//!
//! When Redis is down the writer keeps the coalesced state in memory (one entry per distinct
//! user and node), reconnects with a backoff of 10 ms doubling to 1 s, counts the errors, logs
//! the first failure and the recovery once each, and writes everything when Redis is back. A
//! connection that sees no round trip for a second is checked with a `PING`, so a restarted
//! server is noticed even while no ops come. Because a server that went away may have come back
//! empty (no persistence) or be a replica that lacks recent writes, every reconnect after a
//! connection error also queues a rewrite of the field of every user the writer knows as online
//! (the `Online` script, with its own run). This resync goes through the same bounded pipelines
//! as the other writes, at most a few per loop turn with the queues drained between them, after
//! the pending writes, so even hundreds of thousands of users never starve the producers. It
//! never overrides newer state: a user with a pending write at that node is skipped (that write
//! follows), and each user's location is read when its batch is built, so one who went offline
//! meanwhile is not resurrected.
//!
//! [`SessionMetrics`] exposes the counters.
//!
//! [`SessionReader`] is the lookup side for the core (a plain thread where blocking is fine):
//! [`SessionReader::get`] and the pipelined [`SessionReader::get_many`], which also re-reads the
//! run table at most once a second (in the same round trip) to leave out fields of dead runs;
//! it reconnects after a connection error.

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
#[derive(Debug, Clone)]
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
    /// Called on the writer's thread once it has been idle (no op taken, nothing written) for
    /// [`crate::idle::IDLE_HOOK_AFTER`], once per idle period; the edge passes its allocator's
    /// collection. Default none.
    pub idle_hook: Option<fn()>,
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
            idle_hook: None,
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

/// One live session of a user: the edge node holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSession {
    /// Region of the node.
    pub region: String,
    /// Edge node id.
    pub node: String,
    /// The run of the edge process that wrote it (its start, Unix ms; 0 for a record of the
    /// earlier one-node layout).
    pub run: u64,
    /// Shard on that node (of the user's first session there).
    pub shard: u16,
    /// Unix ms of the login (0 for a record of the earlier layout).
    pub login_ms: u64,
}

/// A user's sessions as stored in Redis, without the fields of dead runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// Every node holding a live session of the user, oldest login first.
    pub sessions: Vec<NodeSession>,
    /// Unix seconds of the latest logout (0: none recorded).
    pub last_seen: u64,
    /// Whether the user is connected anywhere (`sessions` is not empty).
    pub online: bool,
    /// The node of the latest login (empty when offline): for single-node readers.
    pub node: String,
    /// The shard of the latest login.
    pub shard: u16,
    /// The region of the latest login (empty when offline).
    pub region: String,
}

impl SessionRecord {
    /// The numeric ids of the nodes of `region` holding a live session of the user, each once,
    /// in login order (a node name that is not a number is left out).
    pub fn online_nodes(&self, region: &str) -> Vec<u32> {
        let mut nodes: Vec<u32> = Vec::with_capacity(self.sessions.len());
        for s in self.sessions.iter().filter(|s| s.region == region) {
            if let Ok(n) = s.node.parse::<u32>() {
                if !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
        }
        nodes
    }
}

/// A session change sent by an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// The user's first session on `node` (run `run`) in `region` began, at `login_ms`.
    Online {
        /// User id bytes.
        user: Vec<u8>,
        /// Edge node id.
        node: String,
        /// Shard on that node.
        shard: u16,
        /// Region of that node.
        region: String,
        /// The edge process's run id (start time, Unix ms).
        run: u64,
        /// Unix ms of the login.
        login_ms: u64,
    },
    /// The user's last session on `node` (run `run`) in `region` ended at `last_seen` (Unix
    /// seconds): removes that node's field unless a newer run wrote it; see the module doc.
    Offline {
        /// User id bytes.
        user: Vec<u8>,
        /// Edge node id of the writer (where the session ended).
        node: String,
        /// Region of that node.
        region: String,
        /// The edge process's run id.
        run: u64,
        /// Unix seconds of the logout.
        last_seen: u64,
    },
    /// The user is still connected: re-arm the TTL.
    Refresh {
        /// User id bytes.
        user: Vec<u8>,
    },
    /// Edge `node` of `region` runs run `run` (raises the run table): session fields of its
    /// earlier runs are dead.
    Announce {
        /// Edge node id.
        node: String,
        /// Region of that node.
        region: String,
        /// The run id.
        run: u64,
    },
}

impl SessionOp {
    /// The user this op is about (empty for an [`SessionOp::Announce`]).
    pub fn user(&self) -> &[u8] {
        match self {
            Self::Online { user, .. } | Self::Offline { user, .. } | Self::Refresh { user } => user,
            Self::Announce { .. } => &[],
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

/// The Redis key of the run table: `{region}/{node}` → the newest run of that node.
pub const RUNS_KEY: &[u8] = b"session-runs";

/// The hash field of `node`'s session in `region`, `@{region}/{node}`.
pub fn node_field(region: &str, node: &str) -> String {
    format!("@{region}/{node}")
}

/// What a pending write is about: one user at one node, a user's TTL, or a node's run.
type PendingKey = (Vec<u8>, String, String);

/// The coalesced write waiting for one user at one node (key: user, node, region), for one
/// user's TTL (key: user, "", "") or for one node's run (key: "", node, region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Online { shard: u16, run: u64, login_ms: u64 },
    Offline { run: u64, last_seen: u64 },
    Refresh,
    Announce { run: u64 },
}

impl Pending {
    fn run(&self) -> u64 {
        match *self {
            Pending::Online { run, .. }
            | Pending::Offline { run, .. }
            | Pending::Announce { run } => run,
            Pending::Refresh => 0,
        }
    }
}

/// Folds `op` into the pending writes so that writing the result gives what writing the ops
/// one by one would: per user and node the latest state wins, except that a write of an older
/// run than the pending one is dropped (the scripts would ignore it); an `Offline` after an
/// `Offline` keeps the later logout time; a refresh is an `EXPIRE` of its own.
fn coalesce(pending: &mut HashMap<PendingKey, Pending>, op: SessionOp) {
    let (key, new) = match op {
        SessionOp::Online {
            user,
            node,
            shard,
            region,
            run,
            login_ms,
        } => (
            (user, node, region),
            Pending::Online {
                shard,
                run,
                login_ms,
            },
        ),
        SessionOp::Offline {
            user,
            node,
            region,
            run,
            last_seen,
        } => ((user, node, region), Pending::Offline { run, last_seen }),
        SessionOp::Refresh { user } => {
            pending
                .entry((user, String::new(), String::new()))
                .or_insert(Pending::Refresh);
            return;
        }
        SessionOp::Announce { node, region, run } => {
            ((Vec::new(), node, region), Pending::Announce { run })
        }
    };
    match pending.get_mut(&key) {
        None => {
            pending.insert(key, new);
        }
        Some(old) if new.run() < old.run() => {}
        Some(old) => {
            *old = match (*old, new) {
                (Pending::Offline { last_seen: a, .. }, Pending::Offline { run, last_seen: b }) => {
                    Pending::Offline {
                        run,
                        last_seen: a.max(b),
                    }
                }
                (_, new) => new,
            };
        }
    }
}

/// The `Online` write. `KEYS[1]`: the session key, `KEYS[2]`: the run table; `ARGV`: the
/// place (`{region}/{node}`), the run, the field value, the TTL. Returns 0 and writes nothing
/// when that node already runs a newer run (in the table or in the field); else raises the
/// table to this run, deletes the key's fields of dead runs and the fields of the earlier
/// one-node layout, sets the field, re-arms the TTL and returns 1.
const ONLINE_SCRIPT: &str = r"
local run = tonumber(ARGV[2])
local known = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') or 0
if known > run then return 0 end
if known < run then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
local field = '@' .. ARGV[1]
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 1) == '@' then
    local r = tonumber(string.match(all[i + 1], '^(%d+)')) or 0
    if f == field then
      if r > run then return 0 end
    else
      local k = tonumber(redis.call('HGET', KEYS[2], string.sub(f, 2)) or '0') or 0
      if r < k then redis.call('HDEL', KEYS[1], f) end
    end
  end
end
redis.call('HDEL', KEYS[1], 'node', 'shard', 'region', 'online')
redis.call('HSET', KEYS[1], field, ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
";

/// The `Offline` write. `KEYS[1]`: the session key; `ARGV`: the place, the run, `last_seen`,
/// the TTL, the node, the region. Deletes the node's field when its run is not newer than this
/// one (and a record of the earlier layout at this node and region), raises `last_seen`,
/// re-arms the TTL; returns 1 when a session was removed, else 0.
const OFFLINE_SCRIPT: &str = r"
local field = '@' .. ARGV[1]
local cur = redis.call('HGET', KEYS[1], field)
local done = 0
if cur then
  local r = tonumber(string.match(cur, '^(%d+)')) or 0
  if r <= tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], field)
    done = 1
  end
end
local old = redis.call('HMGET', KEYS[1], 'node', 'region')
if old[1] == ARGV[5] and (old[2] or '') == ARGV[6] then
  redis.call('HDEL', KEYS[1], 'node', 'shard', 'region', 'online')
  done = 1
end
local seen = tonumber(redis.call('HGET', KEYS[1], 'last_seen') or '0') or 0
if tonumber(ARGV[3]) > seen then redis.call('HSET', KEYS[1], 'last_seen', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return done
";

/// Raises a node's run in the run table. `KEYS[1]`: the run table; `ARGV`: the place, the run.
/// Returns 1 when it was raised.
const ANNOUNCE_SCRIPT: &str = r"
local known = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if known < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// The writer's scripts, indexed by [`Script`].
const SCRIPTS: [&str; 3] = [ONLINE_SCRIPT, OFFLINE_SCRIPT, ANNOUNCE_SCRIPT];

/// Which script a write runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Online = 0,
    Offline = 1,
    Announce = 2,
}

/// The script `p` runs, if any (a refresh is a plain `EXPIRE`).
fn script_of(p: &Pending) -> Option<Script> {
    match p {
        Pending::Online { .. } => Some(Script::Online),
        Pending::Offline { .. } => Some(Script::Offline),
        Pending::Announce { .. } => Some(Script::Announce),
        Pending::Refresh => None,
    }
}

/// Starts the call of `script`: `EVALSHA` once its SHA1 is known (the pipeline loads it first),
/// else `EVAL` with the whole text.
fn eval<'a>(
    pipe: &'a mut redis::Pipeline,
    script: Script,
    shas: &[Option<String>; 3],
) -> &'a mut redis::Pipeline {
    match &shas[script as usize] {
        Some(sha) => pipe.cmd("EVALSHA").arg(sha.as_str()),
        None => pipe.cmd("EVAL").arg(SCRIPTS[script as usize]),
    }
}

/// Appends the `Online` write of `user`'s field at (`node`, `region`).
#[allow(clippy::too_many_arguments)]
fn push_online(
    pipe: &mut redis::Pipeline,
    shas: &[Option<String>; 3],
    user: &[u8],
    node: &str,
    region: &str,
    shard: u16,
    run: u64,
    login_ms: u64,
    ttl: u64,
) {
    eval(pipe, Script::Online, shas)
        .arg(2u8)
        .arg(session_key(user))
        .arg(RUNS_KEY)
        .arg(format!("{region}/{node}"))
        .arg(run)
        .arg(format!("{run}/{shard}/{login_ms}"))
        .arg(ttl);
}

/// Appends the command of one pending write (one command each).
fn push_write(
    pipe: &mut redis::Pipeline,
    (user, node, region): &PendingKey,
    p: &Pending,
    ttl: u64,
    shas: &[Option<String>; 3],
) {
    match *p {
        Pending::Online {
            shard,
            run,
            login_ms,
        } => push_online(pipe, shas, user, node, region, shard, run, login_ms, ttl),
        Pending::Offline { run, last_seen } => {
            eval(pipe, Script::Offline, shas)
                .arg(1u8)
                .arg(session_key(user))
                .arg(format!("{region}/{node}"))
                .arg(run)
                .arg(last_seen)
                .arg(ttl)
                .arg(node.as_str())
                .arg(region.as_str());
        }
        Pending::Refresh => {
            pipe.cmd("EXPIRE").arg(session_key(user)).arg(ttl);
        }
        Pending::Announce { run } => {
            eval(pipe, Script::Announce, shas)
                .arg(1u8)
                .arg(RUNS_KEY)
                .arg(format!("{region}/{node}"))
                .arg(run);
        }
    }
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

/// Where an online user is: its shard, login time and an index into [`Places`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    place: u32,
    shard: u16,
    login_ms: u64,
}

/// One interned node, region and run, with how many online users are there.
#[derive(Debug)]
struct Place {
    node: String,
    region: String,
    run: u64,
    users: usize,
}

/// The interned (node, region, run) triples of the online users. A writer serves one edge run,
/// so there is normally a single entry; a triple no user is at any more is freed and its slot
/// reused, so the table never outgrows the distinct locations in use.
#[derive(Debug, Default)]
struct Places {
    slots: Vec<Place>,
    ids: HashMap<(String, String, u64), u32>,
    free: Vec<u32>,
    /// The last interned id: the lookup of the usual (only) triple without building a key.
    last: Option<u32>,
}

impl Places {
    /// The id of (`node`, `region`, `run`), interned if new, with one more user counted there.
    fn acquire(&mut self, node: &str, region: &str, run: u64) -> u32 {
        let id = match self.last {
            Some(id) if self.is(id, node, region, run) => id,
            _ => self.lookup_or_insert(node, region, run),
        };
        self.slots[id as usize].users += 1;
        self.last = Some(id);
        id
    }

    fn is(&self, id: u32, node: &str, region: &str, run: u64) -> bool {
        let p = &self.slots[id as usize];
        p.node == node && p.region == region && p.run == run
    }

    fn lookup_or_insert(&mut self, node: &str, region: &str, run: u64) -> u32 {
        let key = (node.to_owned(), region.to_owned(), run);
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let place = Place {
            node: key.0.clone(),
            region: key.1.clone(),
            run,
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
                slot.run,
            );
            self.ids.remove(&key);
            self.free.push(id);
            if self.last == Some(id) {
                self.last = None;
            }
        }
    }

    fn get(&self, id: u32) -> &Place {
        &self.slots[id as usize]
    }
}

/// Where the writer last wrote a user online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OnlineAt<'a> {
    node: &'a str,
    region: &'a str,
    run: u64,
    shard: u16,
    login_ms: u64,
}

/// The users the writer last wrote as online, with their location (for the refresh sweep and
/// the resync after a reconnect).
#[derive(Debug, Default)]
struct OnlineUsers {
    users: HashMap<Vec<u8>, Loc>,
    places: Places,
}

impl OnlineUsers {
    fn set_online(&mut self, user: Vec<u8>, at: OnlineAt<'_>) {
        let loc = Loc {
            place: self.places.acquire(at.node, at.region, at.run),
            shard: at.shard,
            login_ms: at.login_ms,
        };
        if let Some(old) = self.users.insert(user, loc) {
            self.places.release(old.place);
        }
    }

    /// `user` is no longer online at (`node`, `region`) (a location written since stays).
    fn set_offline(&mut self, user: &[u8], node: &str, region: &str) {
        let here = self.users.get(user).is_some_and(|l| {
            let p = self.places.get(l.place);
            p.node == node && p.region == region
        });
        if here {
            if let Some(old) = self.users.remove(user) {
                self.places.release(old.place);
            }
        }
    }

    /// Where `user` is online.
    fn get(&self, user: &[u8]) -> Option<OnlineAt<'_>> {
        let loc = self.users.get(user)?;
        let p = self.places.get(loc.place);
        Some(OnlineAt {
            node: &p.node,
            region: &p.region,
            run: p.run,
            shard: loc.shard,
            login_ms: loc.login_ms,
        })
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
    /// Coalesced writes, per user and node (see [`Pending`]).
    pending: HashMap<PendingKey, Pending>,
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
    script_sha: [Option<String>; 3],
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
            script_sha: [None, None, None],
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
        let mut idle = crate::idle::IdleHook::new(self.cfg.idle_hook);
        let mut ops_seen = self.metrics.ops_in.load(Ordering::Relaxed);

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
            let ops_in = self.metrics.ops_in.load(Ordering::Relaxed);
            idle.note(used > 0 || ops_in != ops_seen, now);
            ops_seen = ops_in;
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

    /// Writes pending users in pipelines of up to `max_batch` writes, at most `max_chunks`
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
            let keys: Vec<PendingKey> = self.pending.keys().take(batch).cloned().collect();
            let mut chunk: Vec<(PendingKey, Pending)> = Vec::with_capacity(keys.len());
            for k in keys {
                if let Some(p) = self.pending.remove(&k) {
                    chunk.push((k, p));
                }
            }
            self.pipe.clear();
            // Each script used is loaded ahead of its `EVALSHA`s in the same round trip, so a
            // restarted server or a flushed script cache cannot fail them; the reply is its SHA1.
            let mut loaded: Vec<Script> = Vec::new();
            for (_, p) in &chunk {
                if let Some(sc) = script_of(p) {
                    if !loaded.contains(&sc) {
                        loaded.push(sc);
                        self.pipe
                            .cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(SCRIPTS[sc as usize]);
                    }
                }
            }
            for (key, p) in &chunk {
                push_write(&mut self.pipe, key, p, ttl, &self.script_sha);
            }
            match self.round_trip() {
                Some(Ok(results)) => {
                    self.count_refused(&results);
                    for (sc, r) in loaded.iter().zip(&results) {
                        let sha = match r {
                            Ok(Value::BulkString(sha)) => String::from_utf8(sha.clone()).ok(),
                            Ok(Value::SimpleString(sha)) => Some(sha.clone()),
                            _ => None,
                        };
                        if sha.is_some() {
                            self.script_sha[*sc as usize] = sha;
                        }
                    }
                    let written = chunk.len() as u64;
                    let (mut stale, mut kept) = (0u64, 0u64);
                    for (((user, node, region), p), r) in
                        chunk.into_iter().zip(&results[loaded.len()..])
                    {
                        let done = !matches!(r, Ok(Value::Int(0)));
                        match p {
                            Pending::Online {
                                shard,
                                run,
                                login_ms,
                            } => {
                                if done {
                                    let at = OnlineAt {
                                        node: &node,
                                        region: &region,
                                        run,
                                        shard,
                                        login_ms,
                                    };
                                    self.online.set_online(user, at);
                                } else {
                                    // This node already runs a newer run: this one is dead.
                                    stale += 1;
                                    self.online.set_offline(&user, &node, &region);
                                }
                            }
                            Pending::Offline { .. } => {
                                if !done {
                                    kept += 1;
                                }
                                self.online.set_offline(&user, &node, &region);
                            }
                            Pending::Refresh | Pending::Announce { .. } => {}
                        }
                    }
                    if stale > 0 {
                        tracing::debug!(
                            users = stale,
                            "online writes of a run older than the node's newest, ignored"
                        );
                    }
                    if kept > 0 {
                        tracing::debug!(
                            users = kept,
                            "offline writes found no session of this node and run"
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

    /// Rewrites, with the `Online` script of its own node and run, up to `max_chunks` batches
    /// of the users in the resync queue that are still online here and have no newer write
    /// pending. Stops at the first failure (the batch stays queued; the reconnect queues
    /// everyone anyway).
    fn resync_chunks(&mut self, max_chunks: usize) {
        let ttl = self.cfg.ttl_secs;
        let batch = self.max_batch();
        let mut chunks = 0usize;
        while !self.resync_queue.is_empty() && chunks < max_chunks {
            if !self.ensure_conn() {
                break;
            }
            let n = self.resync_queue.len().min(batch);
            let start = self.resync_queue.len() - n;
            self.pipe.clear();
            // Loaded first, as in `flush`.
            self.pipe
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPTS[Script::Online as usize]);
            let mut users = 0u64;
            for user in &self.resync_queue[start..] {
                // Written offline since it was queued: nothing to restore.
                let Some(at) = self.online.get(user) else {
                    continue;
                };
                // A pending write of this node is newer and is written anyway (a pending
                // refresh is only an `EXPIRE`, which a lost key needs this write for).
                let key = (user.clone(), at.node.to_owned(), at.region.to_owned());
                if self.pending.contains_key(&key) {
                    continue;
                }
                push_online(
                    &mut self.pipe,
                    &self.script_sha,
                    user,
                    at.node,
                    at.region,
                    at.shard,
                    at.run,
                    at.login_ms,
                    ttl,
                );
                users += 1;
            }
            if users == 0 {
                self.resync_queue.truncate(start);
                continue;
            }
            match self.round_trip() {
                Some(Ok(results)) => {
                    self.count_refused(&results);
                    if let Some(Ok(Value::BulkString(sha))) = results.first() {
                        self.script_sha[Script::Online as usize] =
                            String::from_utf8(sha.clone()).ok();
                    }
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

/// How long the reader trusts its copy of the run table.
const RUNS_MAX_AGE: Duration = Duration::from_secs(1);

/// The reader's copy of the run table: `{region}/{node}` → newest run.
#[derive(Debug, Default)]
struct RunTable {
    runs: HashMap<Vec<u8>, u64>,
    fetched: Option<Instant>,
}

/// Looks sessions up (blocking; for the core's own threads, never a shard).
pub struct SessionReader {
    client: Client,
    conn: Mutex<Option<Connection>>,
    runs: Mutex<RunTable>,
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
            runs: Mutex::new(RunTable::default()),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms.max(1)),
            io_timeout: Duration::from_millis(cfg.io_timeout_ms.max(1)),
        })
    }

    /// `user`'s sessions, or `None` when there is no record (never written or expired).
    pub fn get(&self, user: &[u8]) -> Result<Option<SessionRecord>, CoreError> {
        let mut v = self.get_many(&[user])?;
        Ok(v.pop().flatten())
    }

    /// The sessions of `users`, in order, in one pipelined round trip, without the fields of
    /// runs the run table shows dead (the table is re-read in the same round trip when the
    /// reader's copy is older than a second).
    pub fn get_many<U: AsRef<[u8]>>(
        &self,
        users: &[U],
    ) -> Result<Vec<Option<SessionRecord>>, CoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut table = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let reread = table.fetched.is_none_or(|t| t.elapsed() >= RUNS_MAX_AGE);
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HGETALL").arg(session_key(u.as_ref()));
        }
        if reread {
            pipe.cmd("HGETALL").arg(RUNS_KEY);
        }
        let mut maps: Vec<HashMap<Vec<u8>, Vec<u8>>> = self.query(&pipe)?;
        if maps.len() != users.len() + usize::from(reread) {
            return Err(CoreError::corrupt(
                "session reply",
                format!("{} replies for {} users", maps.len(), users.len()),
            ));
        }
        if reread {
            let runs = maps.pop().unwrap_or_default();
            table.runs = runs
                .into_iter()
                .filter_map(|(place, run)| Some((place, parse_u64(&run)?)))
                .collect();
            table.fetched = Some(Instant::now());
        }
        Ok(maps.iter().map(|m| parse_record(m, &table.runs)).collect())
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

/// A decimal `u64` (`None` when the bytes are not one).
fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Decodes a session hash; an empty hash (missing key) is `None`. A node field whose run is
/// older than `runs` holds for its node is left out (dead run); a malformed field is left out
/// too (and logged at debug). A record of the earlier one-node layout (`node`, `shard`,
/// `region`, `online`) reads as one session of run 0 when it is online.
fn parse_record(
    map: &HashMap<Vec<u8>, Vec<u8>>,
    runs: &HashMap<Vec<u8>, u64>,
) -> Option<SessionRecord> {
    if map.is_empty() {
        return None;
    }
    let mut rec = SessionRecord {
        last_seen: map
            .get(&b"last_seen"[..])
            .and_then(|v| parse_u64(v))
            .unwrap_or(0),
        ..SessionRecord::default()
    };
    for (field, value) in map {
        let Some(place) = field.strip_prefix(b"@") else {
            continue;
        };
        match parse_node_field(place, value) {
            Some(s) => {
                if runs.get(place).is_some_and(|&newest| s.run < newest) {
                    continue; // a dead run of that node
                }
                rec.sessions.push(s);
            }
            None => tracing::debug!(
                field = %String::from_utf8_lossy(field),
                "malformed session field, ignored"
            ),
        }
    }
    let text = |f: &[u8]| map.get(f).and_then(|v| String::from_utf8(v.clone()).ok());
    if map
        .get(&b"online"[..])
        .is_some_and(|v| v.as_slice() == b"1")
    {
        if let (Some(node), Some(region)) = (text(b"node"), text(b"region")) {
            let shard = map
                .get(&b"shard"[..])
                .and_then(|v| parse_u64(v))
                .unwrap_or(0);
            rec.sessions.push(NodeSession {
                region,
                node,
                run: 0,
                shard: u16::try_from(shard).unwrap_or(u16::MAX),
                login_ms: 0,
            });
        }
    }
    rec.sessions
        .sort_by(|a, b| (a.login_ms, &a.region, &a.node).cmp(&(b.login_ms, &b.region, &b.node)));
    if let Some(latest) = rec.sessions.last() {
        rec.online = true;
        rec.node = latest.node.clone();
        rec.shard = latest.shard;
        rec.region = latest.region.clone();
    }
    Some(rec)
}

/// One node field: `{region}/{node}` = `{run}/{shard}/{login_ms}`.
fn parse_node_field(place: &[u8], value: &[u8]) -> Option<NodeSession> {
    let place = std::str::from_utf8(place).ok()?;
    let (region, node) = place.split_once('/')?;
    let mut parts = std::str::from_utf8(value).ok()?.split('/');
    let run = parts.next()?.parse().ok()?;
    let shard = parts.next()?.parse().ok()?;
    let login_ms = parts.next()?.parse().ok()?;
    if parts.next().is_some() || region.is_empty() || node.is_empty() {
        return None;
    }
    Some(NodeSession {
        region: region.to_owned(),
        node: node.to_owned(),
        run,
        shard,
        login_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_binary_safe() {
        assert_eq!(session_key(b"a:\xff\x00"), b"session:a:\xff\x00".to_vec());
        assert_eq!(node_field("eu", "7"), "@eu/7");
    }

    fn online(u: &[u8], node: &str, run: u64, shard: u16) -> SessionOp {
        SessionOp::Online {
            user: u.to_vec(),
            node: node.into(),
            shard,
            region: "eu".into(),
            run,
            login_ms: run + 1,
        }
    }

    fn offline(u: &[u8], node: &str, run: u64, last_seen: u64) -> SessionOp {
        SessionOp::Offline {
            user: u.to_vec(),
            node: node.into(),
            region: "eu".into(),
            run,
            last_seen,
        }
    }

    fn key(u: &[u8], node: &str) -> PendingKey {
        (u.to_vec(), node.to_owned(), "eu".to_owned())
    }

    #[test]
    fn coalescing_keeps_the_latest_per_user_and_node() {
        let mut p = HashMap::new();
        let u = b"u".to_vec();
        coalesce(&mut p, SessionOp::Refresh { user: u.clone() });
        coalesce(&mut p, online(&u, "1", 100, 3));
        coalesce(&mut p, online(&u, "2", 200, 5));
        assert_eq!(p.len(), 3, "a refresh and one write per node");
        coalesce(&mut p, offline(&u, "1", 100, 42));
        coalesce(&mut p, offline(&u, "1", 100, 41));
        assert_eq!(
            p[&key(&u, "1")],
            Pending::Offline {
                run: 100,
                last_seen: 42
            },
            "the later logout time is kept"
        );
        assert!(matches!(p[&key(&u, "2")], Pending::Online { shard: 5, .. }));
        coalesce(&mut p, online(&u, "1", 100, 4));
        assert!(matches!(p[&key(&u, "1")], Pending::Online { shard: 4, .. }));
        // A write of an older run of the node than the pending one is what the scripts ignore.
        coalesce(&mut p, offline(&u, "2", 150, 9));
        assert!(matches!(p[&key(&u, "2")], Pending::Online { run: 200, .. }));
        coalesce(&mut p, online(&u, "2", 300, 6));
        assert!(matches!(p[&key(&u, "2")], Pending::Online { run: 300, .. }));
        // Announcements keep the newest run.
        for run in [5, 9, 7] {
            coalesce(
                &mut p,
                SessionOp::Announce {
                    node: "1".into(),
                    region: "eu".into(),
                    run,
                },
            );
        }
        assert_eq!(p[&key(b"", "1")], Pending::Announce { run: 9 });
        assert!(SessionOp::Announce {
            node: "1".into(),
            region: "eu".into(),
            run: 1
        }
        .user()
        .is_empty());
    }

    fn at<'a>(node: &'a str, region: &'a str, run: u64, shard: u16) -> OnlineAt<'a> {
        OnlineAt {
            node,
            region,
            run,
            shard,
            login_ms: 7,
        }
    }

    #[test]
    fn online_users_intern_locations() {
        let mut o = OnlineUsers::default();
        for i in 0..100u16 {
            o.set_online(format!("u{i}").into_bytes(), at("edge-1", "eu", 5, i));
        }
        assert_eq!(o.places.slots.len(), 1, "one location interned once");
        assert_eq!(o.get(b"u7"), Some(at("edge-1", "eu", 5, 7)));
        // Moving a user (same name again) replaces its location.
        o.set_online(b"u7".to_vec(), at("edge-2", "eu", 5, 9));
        assert_eq!(o.get(b"u7"), Some(at("edge-2", "eu", 5, 9)));
        assert_eq!(o.len(), 100);
        assert_eq!(o.places.slots[0].users, 99);
        // The same node in another region, or another run, is another location.
        o.set_online(b"u8".to_vec(), at("edge-2", "us", 5, 1));
        o.set_online(b"u9".to_vec(), at("edge-1", "eu", 6, 1));
        assert_eq!(o.get(b"u8"), Some(at("edge-2", "us", 5, 1)));
        assert_eq!(o.places.ids.len(), 4);
        // An offline of another location leaves the user where it was written last.
        o.set_offline(b"u7", "edge-1", "eu");
        assert_eq!(o.get(b"u7"), Some(at("edge-2", "eu", 5, 9)));
        // A location nobody is at any more is freed and its slot reused.
        o.set_offline(b"u7", "edge-2", "eu");
        o.set_offline(b"u7", "edge-2", "eu");
        assert_eq!(o.get(b"u7"), None);
        assert_eq!(o.places.ids.len(), 3);
        o.set_online(b"u7".to_vec(), at("edge-3", "eu", 5, 2));
        assert_eq!(o.places.slots.len(), 4, "freed slot reused");
        assert_eq!(o.get(b"u7"), Some(at("edge-3", "eu", 5, 2)));
        assert_eq!(o.get(b"u1"), Some(at("edge-1", "eu", 5, 1)));
        for i in 0..100u16 {
            let u = format!("u{i}");
            let (node, region) = o
                .get(u.as_bytes())
                .map(|a| (a.node.to_owned(), a.region.to_owned()))
                .unwrap();
            o.set_offline(u.as_bytes(), &node, &region);
        }
        assert_eq!(o.len(), 0);
        assert!(o.places.ids.is_empty());
        assert!(o.places.slots.iter().all(|p| p.users == 0));
    }

    #[test]
    fn write_commands() {
        let mut pipe = redis::pipe();
        let shas = [Some("abc".to_owned()), None, None];
        let p = Pending::Online {
            shard: 3,
            run: 1_700_000_000_000,
            login_ms: 1_700_000_000_005,
        };
        push_write(&mut pipe, &key(b"u", "4"), &p, 60, &shas);
        let p = Pending::Offline {
            run: 1_700_000_000_000,
            last_seen: 9,
        };
        push_write(&mut pipe, &key(b"u", "4"), &p, 60, &shas);
        push_write(&mut pipe, &key(b"u", ""), &Pending::Refresh, 60, &shas);
        let cmds: Vec<String> = pipe
            .cmd_iter()
            .map(|c| String::from_utf8_lossy(&c.get_packed_command()).replace("\r\n", " "))
            .collect();
        assert_eq!(cmds.len(), 3);
        assert!(cmds[0].contains("EVALSHA $3 abc $1 2 $9 session:u $12 session-runs $4 eu/4 $13 1700000000000 $29 1700000000000/3/1700000000005 $2 60"), "{}", cmds[0]);
        assert!(cmds[1].contains("EVAL $"), "{}", cmds[1]);
        assert!(
            cmds[1].ends_with("$1 1 $9 session:u $4 eu/4 $13 1700000000000 $1 9 $2 60 $1 4 $2 eu "),
            "{}",
            cmds[1]
        );
        assert!(
            cmds[2].starts_with("*3 $6 EXPIRE $9 session:u $2 60"),
            "{}",
            cmds[2]
        );
    }

    fn map(fields: &[(&str, &str)]) -> HashMap<Vec<u8>, Vec<u8>> {
        fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn records_hold_every_live_node() {
        let none = HashMap::new();
        assert_eq!(parse_record(&HashMap::new(), &none), None);
        let m = map(&[
            ("@eu/2", "100/1/5000"),
            ("@eu/1", "90/0/4000"),
            ("@us/3", "80/2/6000"),
            ("last_seen", "12"),
        ]);
        let r = parse_record(&m, &none).unwrap();
        assert!(r.online);
        assert_eq!(r.last_seen, 12);
        assert_eq!(r.sessions.len(), 3);
        assert_eq!(r.online_nodes("eu"), vec![1, 2], "in login order");
        assert_eq!(r.online_nodes("us"), vec![3]);
        assert!(r.online_nodes("ap").is_empty());
        assert_eq!(
            (r.node.as_str(), r.shard, r.region.as_str()),
            ("3", 2, "us")
        );
        // Node 2 restarted (run 150): its field of run 100 is dead.
        let runs: HashMap<Vec<u8>, u64> = [(b"eu/2".to_vec(), 150), (b"eu/1".to_vec(), 90)]
            .into_iter()
            .collect();
        let r = parse_record(&m, &runs).unwrap();
        assert_eq!(r.online_nodes("eu"), vec![1]);
        // Only a logout left: offline.
        let r = parse_record(&map(&[("last_seen", "33")]), &none).unwrap();
        assert!(!r.online && r.sessions.is_empty() && r.node.is_empty());
        assert_eq!(r.last_seen, 33);
    }

    #[test]
    fn malformed_and_old_layout_records() {
        let none = HashMap::new();
        let m = map(&[
            ("@eu/1", "x/0/1"),
            ("@eu", "1/0/1"),
            ("@eu/2", "1/0/1/9"),
            ("@eu/3", "1/70000/1"),
            ("@eu/4", "1/0/1"),
            ("last_seen", "nope"),
        ]);
        let r = parse_record(&m, &none).unwrap();
        assert_eq!(r.online_nodes("eu"), vec![4]);
        assert_eq!(r.last_seen, 0);
        // The earlier one-node layout.
        let old = map(&[
            ("node", "7"),
            ("shard", "1"),
            ("region", "eu"),
            ("online", "1"),
            ("last_seen", "0"),
        ]);
        let r = parse_record(&old, &none).unwrap();
        assert_eq!(r.online_nodes("eu"), vec![7]);
        assert_eq!(r.sessions[0].run, 0);
        let old_off = map(&[
            ("node", "7"),
            ("region", "eu"),
            ("online", "0"),
            ("last_seen", "5"),
        ]);
        let r = parse_record(&old_off, &none).unwrap();
        assert!(!r.online);
        assert_eq!(r.last_seen, 5);
        // A non-numeric node name is a session but not a node id.
        let r = parse_record(&map(&[("@eu/edge-a", "1/0/1")]), &none).unwrap();
        assert!(r.online);
        assert!(r.online_nodes("eu").is_empty());
    }
}
