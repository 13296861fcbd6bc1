//! One shard: a pinned glommio executor that owns its listener, its sockets and its slice of
//! presence, and shares nothing with the other shards.
//!
//! A shard runs these tasks:
//! - the accept loop on its own `SO_REUSEPORT` listener, spawning one [`conn`] task per socket;
//! - one ring reader per peer shard (glommio channel mesh, SPSC), handing [`ShardMsg`]s to
//!   [`Shard::handle_mesh`];
//! - one ring writer per peer shard, which ships the batched outbox to that peer;
//! - the core poller, which moves requests to the in-process core and takes its replies
//!   (crossbeam queues: the core is a plain OS thread, not a glommio executor);
//! - the output budget keeper, which closes the connections holding the most output when all of
//!   the shard's queues together are over `max_output_bytes_per_shard`.
//!
//! Routing a message to user `u`: its owner shard is `hash(u) % shards` ([`owner_of`]); the
//! owner's [`presence`] slice knows which shard and connection hold `u`. So a message takes at
//! most two ring hops: sender's shard → owner → recipient's shard. Every accepted message is
//! also handed to the core, which stores it until it is acked.

pub mod conn;
pub mod presence;
pub mod tls_conn;
pub mod transport;
pub mod v2;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};

use crossbeam::channel::TrySendError;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpListener;
use iris_core::api::{ConnId, CoreReply, CoreRequest, ShardLink};
use tracing::{debug, info, warn};

use crate::config::{BusKind, EdgeConfig};
use crate::idgen::{HighWater, IdGen};
use crate::metrics::ShardMetrics;
use crate::protocol::{frame, Limits};
use conn::ConnShared;
use presence::Presence;

/// Something that will be written to a recipient's socket.
#[derive(Debug)]
pub struct Delivery {
    /// The message id for reliable messages (stored, acked); `None` for best-effort relays
    /// (typing, read receipts), which are never stored.
    pub id: Option<u64>,
    /// The complete v1 server frame, followed by the sender's name (`meta.sender_len` bytes)
    /// for a v2 recipient's DELIVER: one allocation per message, whatever the recipients speak
    /// (a v1 connection writes [`Delivery::v1_frame`], a v2 one its v2 equivalent, `v2.rs`).
    pub frame: Vec<u8>,
    /// What a v2 recipient's DELIVER says beside the payload.
    pub meta: Meta,
}

/// A message's sender length (the tail of [`Delivery::frame`]) and payload kind, for v2
/// recipients (0 for relays and for messages that came over the bus without a sender).
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    pub sender_len: u16,
    /// v2 `kind`: 0 plain, 1 CBOR, 2 E2EE inner frame.
    pub kind: u8,
}

impl Delivery {
    /// The v1 frame, without the sender's name behind it.
    pub fn v1_frame(&self) -> &[u8] {
        &self.frame[..self.frame.len() - usize::from(self.meta.sender_len)]
    }

    /// The sender's name carried behind the v1 frame (empty when unknown).
    pub fn sender(&self) -> &[u8] {
        &self.frame[self.frame.len() - usize::from(self.meta.sender_len)..]
    }

    /// Drops the sender's name: the bytes a v1 connection writes.
    pub fn into_v1_frame(mut self) -> Vec<u8> {
        let n = self.frame.len() - usize::from(self.meta.sender_len);
        self.frame.truncate(n);
        self.frame
    }

    /// A best-effort relay (typing, receipt).
    pub fn relay(frame: Vec<u8>) -> Self {
        Self {
            id: None,
            frame,
            meta: Meta::default(),
        }
    }
}

/// Most keys (addresses, users) a shard keeps rate-limit buckets for (`ratelimit::Buckets`).
const RATE_TABLE_MAX: usize = 65_536;

/// A v2 SEND waiting for the core's confirmation ([`Shard::await_confirm`]).
#[derive(Debug)]
struct PendingSend {
    id: u64,
    target: Vec<u8>,
    d: Delivery,
}

/// What shards send each other over the rings.
#[derive(Debug)]
pub enum ShardMsg {
    /// To the owner of `to`: hand `d` to every session of `to` (as [`Shard::route_owned`]
    /// does for a delivery that came `via`).
    Route { to: Vec<u8>, d: Delivery, via: Via },
    /// To the shard hosting `conn`: write `d` if `conn` is still logged in as `user`.
    Deliver {
        conn: ConnId,
        user: Vec<u8>,
        d: Delivery,
    },
    /// To the owner of `user`: `user` logged in on (`shard`, `conn`).
    Register {
        user: Vec<u8>,
        shard: usize,
        conn: ConnId,
    },
    /// Back to the hosting shard: presence knows the session, start the login drain (or skip
    /// it: `clean`, the user's inbox is known empty, [`presence`] "Known empty inboxes").
    Registered {
        user: Vec<u8>,
        conn: ConnId,
        clean: bool,
    },
    /// To the owner of `user`: the session on (`shard`, `conn`) ended; `drained_empty`: its
    /// login drain found nothing (or was skipped as clean).
    Unregister {
        user: Vec<u8>,
        shard: usize,
        conn: ConnId,
        drained_empty: bool,
    },
    /// To the owner of `user`: what is `user`'s status? Reply to (`shard`, `conn`).
    StatusQuery {
        user: Vec<u8>,
        shard: usize,
        conn: ConnId,
    },
    /// Back to the asking shard: a complete STATUS frame for `conn`.
    StatusReply { conn: ConnId, frame: Vec<u8> },
}

/// Requests waiting for the core beyond which connections stop reading.
const CORE_BACKLOG_HIGH: usize = 16_384;
/// Messages waiting for one peer's ring beyond which connections stop reading.
const OUTBOX_HIGH: usize = 65_536;
/// Bytes waiting for one peer's ring beyond which this shard's connections stop reading.
const OUTBOX_BYTES_HIGH: usize = 4 << 20;
/// Bytes on the rings of the whole edge (shipped, not yet handled by the receiving shard)
/// beyond which every shard's connections stop reading. Every ring message starts with a
/// client read (or a reply of the core), so this bounds the chain sender → owner → host end to
/// end: a host that falls behind stops the senders, not just its own clients.
const RING_BYTES_HIGH: u64 = 8 << 20;
/// Requests in the embedded core's queue beyond which a shard's connections stop reading: the
/// queue's capacity (`core_queue_capacity`, 65,536) holds up to 64 MiB of 1 KB messages; the core takes in far fewer per commit window.
const CORE_QUEUE_HIGH: usize = 4096;
/// How long the embedded core poller sleeps at most without a ring (idle heap collection,
/// shutdown checks).
const POLLER_HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Requests queued to the core past which the shard wakes it before its commit window closes.
const CORE_QUEUE_WAKE: usize = 1024;

/// A reply that has not come back after this long is taken as lost (cluster: the bus lost it)
/// and no longer counts against `max_pending_replies`.
const REPLY_FORGET: Duration = Duration::from_secs(10);

/// Limits logged once per process, then only counted.
static LOGGED_REPLIES_FULL: AtomicBool = AtomicBool::new(false);
/// The first time a shard went over `max_output_bytes_per_shard` is logged.
static LOGGED_OUTPUT_BUDGET: AtomicBool = AtomicBool::new(false);

/// What a ring message costs in memory, as counted against [`RING_BYTES_HIGH`].
fn ring_cost(m: &ShardMsg) -> usize {
    64 + match m {
        ShardMsg::Route { to, d, .. } => to.len() + d.frame.len(),
        ShardMsg::Deliver { user, d, .. } => user.len() + d.frame.len(),
        ShardMsg::StatusReply { frame, .. } => frame.len(),
        ShardMsg::Register { user, .. }
        | ShardMsg::Registered { user, .. }
        | ShardMsg::Unregister { user, .. }
        | ShardMsg::StatusQuery { user, .. } => user.len(),
    }
}

/// How long a routed id is remembered (longer than the core's routing takes under load).
const RECENT_ROUTED_TTL: Duration = Duration::from_secs(30);
/// The most routed ids remembered per shard (about 10 MiB at most).
const RECENT_ROUTED_MAX: usize = 262_144;

/// Ids of recently routed messages, each with the presence generation at the time
/// ([`Presence::generation`]), forgotten after [`RECENT_ROUTED_TTL`] or beyond
/// [`RECENT_ROUTED_MAX`]. A later copy of the message goes only to the sessions registered
/// since; a copy arriving after the id is forgotten is written again (at-least-once).
#[derive(Debug, Default)]
struct RecentIds {
    map: HashMap<u64, u64>,
    order: VecDeque<(u64, std::time::Instant)>,
}

impl RecentIds {
    fn prune(&mut self, now: std::time::Instant) {
        while let Some(&(id, at)) = self.order.front() {
            if self.order.len() > RECENT_ROUTED_MAX || now.duration_since(at) > RECENT_ROUTED_TTL {
                self.order.pop_front();
                self.map.remove(&id);
            } else {
                break;
            }
        }
        if self.order.is_empty() && self.map.capacity() > 1024 {
            *self = Self::default();
        }
    }

    /// Remembers that `id` was routed when the presence generation was `generation`.
    fn insert(&mut self, id: u64, generation: u64) {
        let now = std::time::Instant::now();
        self.prune(now);
        if self.map.insert(id, generation).is_none() {
            self.order.push_back((id, now));
        }
    }

    /// Whether `id` was routed (written to a session here), as far as it is remembered.
    fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    /// The presence generation at which `id` was routed, if it is remembered.
    fn get(&mut self, id: u64) -> Option<u64> {
        self.prune(std::time::Instant::now());
        self.map.get(&id).copied()
    }
}

/// Longest a direct copy waits for the core's stream to catch up ([`OrderGate`]).
const DIRECT_HOLD_MAX: Duration = Duration::from_secs(15);
/// A stream ([`OrderGate`]) is forgotten after this long without a message.
const STREAM_IDLE: Duration = Duration::from_secs(30);
/// Direct copies held by one shard beyond which all are released (order is given up before
/// memory).
const HELD_MAX: usize = 65_536;
/// The low bits of a message id that name the accepting region, node and shard (see `idgen`):
/// ids with the same low bits come from one shard, in increasing order.
const ORIGIN_MASK: u64 = (1 << iris_bus::hops::ID_LOW_BITS) - 1;

/// A message whose id is older than this is taken as written when a later one names it as its
/// predecessor (well inside [`RECENT_ROUTED_TTL`], the memory of what was written).
const PREV_HORIZON_MICROS: u64 = 15_000_000;

/// One sending shard's messages to one recipient, as seen by the recipient's owner.
#[derive(Debug)]
struct Stream {
    /// The highest id of a core copy seen: the core's stream has passed every earlier message
    /// of this sending shard to this recipient.
    core_max: u64,
    /// Direct copies waiting for their predecessor, in arrival (= id) order, with it.
    held: VecDeque<(u64, Delivery)>,
    held_since: Option<std::time::Instant>,
    last: std::time::Instant,
}

/// Keeps one sender's messages in order across the two bus paths.
///
/// Each path is in order (one inbox partition, one deliver partition), but a message can be on
/// one path only: sent before the sender's edge knew where the recipient is (core only), or its
/// direct copy lost (the broker restarted). So every direct copy names its predecessor, the
/// message the same sending shard sent to the same recipient before it (`prev`), and is written
/// only once that one was written here, or the core's copies passed it, or it is older than
/// [`PREV_HORIZON_MICROS`]; else it waits (and the direct copies behind it) for at most
/// [`DIRECT_HOLD_MAX`] (the core may never route a copy: stopped, or no session known). A new
/// session of the recipient on this edge releases what waits. Streams are per recipient and
/// sending shard (the low bits of the ids).
#[derive(Debug, Default)]
struct OrderGate {
    users: HashMap<Box<[u8]>, Vec<(u64, Stream)>>,
    held: usize,
    /// When the oldest held copy's wait is over (no scan before).
    next_expiry: Option<std::time::Instant>,
    next_prune: Option<std::time::Instant>,
}

/// Whether a direct copy whose predecessor is `prev` may be written.
fn prev_done(prev: u64, core_max: u64, written: &impl Fn(u64) -> bool) -> bool {
    prev == 0
        || prev <= core_max
        || written(prev)
        || iris_bus::hops::id_age_micros(prev) > PREV_HORIZON_MICROS
}

impl OrderGate {
    fn stream(&mut self, to: &[u8], id: u64, now: std::time::Instant) -> &mut Stream {
        let streams = self.users.entry(to.into()).or_default();
        let origin = id & ORIGIN_MASK;
        let i = match streams.iter().position(|(o, _)| *o == origin) {
            Some(i) => i,
            None => {
                streams.push((
                    origin,
                    Stream {
                        core_max: 0,
                        held: VecDeque::new(),
                        held_since: None,
                        last: now,
                    },
                ));
                streams.len() - 1
            }
        };
        let s = &mut streams[i].1;
        s.last = now;
        s
    }

    /// A direct copy whose predecessor is `prev`: back when it may be written now, else held.
    fn on_direct(
        &mut self,
        to: &[u8],
        d: Delivery,
        prev: u64,
        now: std::time::Instant,
        written: impl Fn(u64) -> bool,
    ) -> Option<Delivery> {
        let id = d.id?;
        let overflow = self.held >= HELD_MAX;
        let s = self.stream(to, id, now);
        if overflow || (s.held.is_empty() && prev_done(prev, s.core_max, &written)) {
            return Some(d);
        }
        s.held.push_back((prev, d));
        let since = *s.held_since.get_or_insert(now);
        self.held += 1;
        let due = since + DIRECT_HOLD_MAX;
        self.next_expiry = Some(self.next_expiry.map_or(due, |t| t.min(due)));
        None
    }

    /// A core copy with id `id` for `to`.
    fn on_core(&mut self, to: &[u8], id: u64, now: std::time::Instant) {
        let s = self.stream(to, id, now);
        s.core_max = s.core_max.max(id);
    }

    /// Whether anything waits for `to`.
    fn holds(&self, to: &[u8]) -> bool {
        self.held > 0
            && self
                .users
                .get(to)
                .is_some_and(|v| v.iter().any(|(_, s)| !s.held.is_empty()))
    }

    /// The next held copy for `to` whose predecessor is done.
    fn next_ready(
        &mut self,
        to: &[u8],
        now: std::time::Instant,
        written: impl Fn(u64) -> bool,
    ) -> Option<Delivery> {
        let streams = self.users.get_mut(to)?;
        for (_, s) in streams.iter_mut() {
            let Some(&(prev, _)) = s.held.front() else {
                continue;
            };
            if prev_done(prev, s.core_max, &written) {
                let (_, d) = s.held.pop_front()?;
                self.held -= 1;
                s.held_since = (!s.held.is_empty()).then_some(now);
                return Some(d);
            }
        }
        None
    }

    /// Every held copy of `to`, in order per stream (a new session of `to`).
    fn reset_user(&mut self, to: &[u8]) -> Vec<Delivery> {
        let Some(streams) = self.users.get_mut(to) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (_, s) in streams.iter_mut() {
            s.held_since = None;
            out.extend(s.held.drain(..).map(|(_, d)| d));
        }
        self.held -= out.len();
        out
    }

    /// Held copies whose wait is over, per recipient; forgets idle streams now and then.
    fn expired(&mut self, now: std::time::Instant) -> Vec<(Vec<u8>, Vec<Delivery>)> {
        let mut out = Vec::new();
        if self.held > 0 && self.next_expiry.is_some_and(|t| now >= t) {
            let mut next: Option<std::time::Instant> = None;
            for (user, streams) in &mut self.users {
                for (_, s) in streams.iter_mut() {
                    let Some(since) = s.held_since else { continue };
                    if now.duration_since(since) >= DIRECT_HOLD_MAX {
                        s.held_since = None;
                        let held: Vec<Delivery> = s.held.drain(..).map(|(_, d)| d).collect();
                        self.held -= held.len();
                        out.push((user.to_vec(), held));
                    } else {
                        let due = since + DIRECT_HOLD_MAX;
                        next = Some(next.map_or(due, |t| t.min(due)));
                    }
                }
            }
            self.next_expiry = next;
        }
        if self.next_prune.is_none_or(|t| now >= t) {
            self.next_prune = Some(now + STREAM_IDLE);
            self.users.retain(|_, streams| {
                streams.retain(|(_, s)| {
                    !s.held.is_empty() || now.duration_since(s.last) < STREAM_IDLE
                });
                !streams.is_empty()
            });
            if self.users.is_empty() && self.users.capacity() > 1024 {
                self.users = HashMap::new();
            }
        }
        out
    }
}

/// On the sender's edge: per recipient and sending shard, the id of the last message sent
/// (the `prev` of the next direct copy), forgotten once older than [`PREV_HORIZON_MICROS`].
/// Keyed by recipient so the lookup made for every message borrows the name (no allocation);
/// a recipient has one entry per sending shard (origin) that wrote to it lately.
#[derive(Debug, Default)]
struct LastSent {
    last: HashMap<Box<[u8]>, Vec<(u64, u64)>>,
    next_prune: Option<std::time::Instant>,
}

impl LastSent {
    /// Records `id` as the last message to `to` of its sending shard; returns the one before.
    fn swap(&mut self, to: &[u8], id: u64) -> u64 {
        let now = std::time::Instant::now();
        if self.next_prune.is_none_or(|t| now >= t) {
            self.next_prune = Some(now + STREAM_IDLE);
            self.last.retain(|_, sent| {
                sent.retain(|&(_, id)| iris_bus::hops::id_age_micros(id) <= PREV_HORIZON_MICROS);
                !sent.is_empty()
            });
            if self.last.is_empty() && self.last.capacity() > 1024 {
                self.last = HashMap::new();
            }
        }
        let origin = id & ORIGIN_MASK;
        let Some(sent) = self.last.get_mut(to) else {
            self.last.insert(to.into(), vec![(origin, id)]);
            return 0;
        };
        match sent.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, last)) => std::mem::replace(last, id),
            None => {
                sent.push((origin, id));
                0
            }
        }
    }
}

/// Where a delivery handed to the owner shard comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Accepted on this edge (the local fast path).
    Local,
    /// The core's routed copy, from this edge's inbox.
    Core,
    /// The sender's edge's live copy, produced straight to this edge's inbox.
    Direct,
}

/// The payload inside a RELIABLE_MSG frame (`0x10 | u16 idlen | id | u32 mlen | payload`).
fn reliable_payload(frame: &[u8]) -> Option<&[u8]> {
    let idlen = usize::from(u16::from_be_bytes([*frame.get(1)?, *frame.get(2)?]));
    let at = 3 + idlen;
    let len = frame.get(at..at + 4)?;
    let mlen = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    frame.get(at + 4..at + 4 + mlen)
}

/// What waits in a shard's backlog for room in the core's queue, in order.
#[derive(Debug)]
enum Backlogged {
    /// A request for the core.
    Req(CoreRequest),
    /// The live copy of a message whose `Store` is ahead of it in the backlog: routed only
    /// once that `Store` is in the core's queue. A login's drain is served after the core took
    /// in every request already queued, so a live copy that reached the recipient's owner
    /// before its session was registered always has its stored twin in that drain.
    Route(Vec<u8>, Delivery),
}

/// A batch of ring messages: one ring slot carries many messages.
pub type Batch = Vec<ShardMsg>;

/// The shard owning user `u`'s presence: the one user hash of Iris
/// ([`iris_bus::topics::user_hash`], FNV-1a), modulo the shard count.
pub fn owner_of(user: &[u8], shards: usize) -> usize {
    iris_bus::topics::partition_of(user, shards as u32) as usize
}

/// A one-waiter wake-up flag for tasks of one shard.
#[derive(Debug, Default)]
pub struct LocalNotify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Everything a shard owns. Lives in an `Rc`: only this shard's thread ever touches it.
pub struct Shard {
    pub id: usize,
    pub nshards: usize,
    pub cfg: Arc<EdgeConfig>,
    pub limits: Limits,
    pub metrics: Arc<ShardMetrics>,
    pub conns: RefCell<HashMap<ConnId, Rc<ConnShared>>>,
    next_conn: Cell<ConnId>,
    pub presence: RefCell<Presence>,
    pub idgen: RefCell<IdGen>,
    /// Cluster mode: the core is reached over the bus (relays and session changes go to it).
    pub cluster: bool,
    /// Cluster mode with `[cluster] direct_live`: live copies go straight to other edges.
    direct_live: bool,
    /// Cluster mode: ids of messages this owner routed to local sessions, so another copy of
    /// the same message (the core's routed copy, or the sender edge's direct one) is not written
    /// again.
    recent_routed: RefCell<RecentIds>,
    /// Cluster mode: per recipient and sending shard, direct copies held until their
    /// predecessor is written, so one sender's messages keep their order.
    gate: RefCell<OrderGate>,
    /// Cluster mode: the last message sent to each recipient per sending shard.
    last_sent: RefCell<LastSent>,
    outbox: Vec<RefCell<Batch>>,
    /// Bytes ([`ring_cost`]) in each peer's outbox, not yet shipped.
    outbox_bytes: Vec<Cell<usize>>,
    /// Bytes on the rings of the whole edge, shared by every shard ([`RING_BYTES_HIGH`]).
    ring_bytes: Arc<AtomicU64>,
    outbox_notify: Vec<LocalNotify>,
    core: ShardLink,
    core_backlog: RefCell<VecDeque<Backlogged>>,
    core_notify: LocalNotify,
    /// When each request with a reply (prekey fetch) was handed to the core, oldest first;
    /// bounded by `max_pending_replies` ([`Shard::replies_full`]).
    pending_replies: RefCell<VecDeque<std::time::Instant>>,
    /// The shard is at `max_pending_replies` (for counting each time it gets there once).
    replies_were_full: Cell<bool>,
    /// Read buffer shared by all connections of the shard: a connection only holds input between
    /// reads when a frame is incomplete, so an idle connection holds none.
    pub scratch: RefCell<Vec<u8>>,
    pub shutting_down: Cell<bool>,
    /// Signalled when the last connection closes during shutdown.
    pub conns_empty: LocalNotify,
    /// v2 SENDs waiting for the core's confirmation, by (connection, client_msg_id): routed
    /// live once confirmed stored (even if the sender left meanwhile), dropped as resends.
    v2_pending: RefCell<HashMap<(ConnId, u64), Vec<PendingSend>>>,
    /// `[rate_limits]` buckets of this shard: logins by source address, sends by user.
    pub login_buckets: RefCell<crate::ratelimit::Buckets<std::net::IpAddr>>,
    pub user_sends: RefCell<crate::ratelimit::Buckets<Box<[u8]>>>,
    /// Output queued for all the shard's connections, not yet written (bytes): the sum of
    /// their accounted queues (`ConnShared::account`).
    output_queued: Cell<usize>,
    /// Told when `output_queued` goes over `max_output_bytes_per_shard`.
    output_sweep: LocalNotify,
    /// `[auth]` on: the token check, its HMAC keyed once for the shard.
    pub auth: Option<crate::auth::Verifier>,
}

impl Shard {
    fn new(
        id: usize,
        nshards: usize,
        cfg: Arc<EdgeConfig>,
        metrics: Arc<ShardMetrics>,
        core: ShardLink,
        (id_floor, id_high): (u64, Arc<HighWater>),
        ring_bytes: Arc<AtomicU64>,
    ) -> Self {
        let cluster = cfg.cluster.bus == BusKind::Kafka;
        let node = if cluster { cfg.cluster.node_id } else { 0 };
        Self {
            id,
            nshards,
            limits: Limits::default(),
            metrics,
            conns: RefCell::new(HashMap::new()),
            // Not 1: a reply addressed to a connection of a previous run (a drain chunk still in
            // the edge's inbox after a restart) must not find a new connection with its number.
            next_conn: Cell::new(crate::idgen::now_micros().max(1)),
            presence: RefCell::new(Presence::new(
                cfg.presence_last_seen_max.div_ceil(nshards.max(1)),
            )),
            idgen: RefCell::new(IdGen::new(
                cfg.cluster.region_index(),
                node,
                id,
                id_floor,
                id_high,
            )),
            cluster,
            direct_live: cluster && cfg.cluster.direct_live,
            recent_routed: RefCell::new(RecentIds::default()),
            gate: RefCell::new(OrderGate::default()),
            last_sent: RefCell::new(LastSent::default()),
            outbox: (0..nshards).map(|_| RefCell::new(Vec::new())).collect(),
            outbox_bytes: (0..nshards).map(|_| Cell::new(0)).collect(),
            ring_bytes,
            outbox_notify: (0..nshards).map(|_| LocalNotify::default()).collect(),
            core,
            core_backlog: RefCell::new(VecDeque::new()),
            core_notify: LocalNotify::default(),
            pending_replies: RefCell::new(VecDeque::new()),
            replies_were_full: Cell::new(false),
            scratch: RefCell::new(vec![0; 64 << 10]),
            shutting_down: Cell::new(false),
            conns_empty: LocalNotify::default(),
            v2_pending: RefCell::new(HashMap::new()),
            login_buckets: RefCell::new(crate::ratelimit::Buckets::new(RATE_TABLE_MAX)),
            user_sends: RefCell::new(crate::ratelimit::Buckets::new(RATE_TABLE_MAX)),
            output_queued: Cell::new(0),
            output_sweep: LocalNotify::default(),
            auth: cfg
                .auth
                .enabled
                .then(|| crate::auth::Verifier::new(&cfg.auth)),
            cfg,
        }
    }

    /// A v2 SEND was handed to the core with its client_msg_id: its live copy waits for the
    /// core's confirmation ([`Self::confirmed`]).
    pub fn await_confirm(&self, conn: ConnId, client: u64, id: u64, target: &[u8], d: Delivery) {
        self.v2_pending
            .borrow_mut()
            .entry((conn, client))
            .or_default()
            .push(PendingSend {
                id,
                target: target.to_vec(),
                d,
            });
    }

    /// The core's confirmations of v2 SENDs made on `conn`: a message stored is routed live
    /// and acknowledged (SEND_ACK), a resend is acknowledged with the first one's id and
    /// dropped, a refused one is answered ERROR naming its client_msg_id.
    fn confirmed(self: &Rc<Self>, conn: ConnId, confirms: Vec<iris_core::api::Confirm>) {
        use iris_core::api::Confirmed;
        use iris_wire::v2::{encode_server, ServerFrame};
        let c = self.conns.borrow().get(&conn).cloned();
        let mut out = Vec::new();
        // In id order, which is the order the connection sent them: the live copies keep it.
        let mut confirms = confirms;
        confirms.sort_unstable_by_key(|cf| cf.id);
        for cf in confirms {
            let pending = {
                let mut map = self.v2_pending.borrow_mut();
                let Some(list) = map.get_mut(&(conn, cf.client)) else {
                    continue;
                };
                // A resend is confirmed with the first message's id: take the entry that is
                // not that one (or any).
                let at = match cf.outcome {
                    Confirmed::Duplicate => list.iter().position(|p| p.id != cf.id).unwrap_or(0),
                    _ => list.iter().position(|p| p.id == cf.id).unwrap_or(0),
                };
                let p = list.swap_remove(at);
                if list.is_empty() {
                    map.remove(&(conn, cf.client));
                }
                p
            };
            match cf.outcome {
                Confirmed::Stored | Confirmed::Duplicate => {
                    if cf.outcome == Confirmed::Stored {
                        // In a cluster the core routed its copy before its fsync (before this
                        // confirm): only this edge's sessions, deduplicated against that copy.
                        let via = if self.cluster { Via::Core } else { Via::Local };
                        self.route_via(&pending.target, pending.d, via);
                        ShardMetrics::inc(&self.metrics.v2_send_acks_total);
                    } else {
                        ShardMetrics::inc(&self.metrics.v2_resends_total);
                    }
                    encode_server(
                        &ServerFrame::SendAck {
                            client_msg_id: cf.client,
                            server_id: cf.id,
                            server_time_unix_ms: v2::id_time_ms(cf.id),
                        },
                        &mut out,
                    );
                }
                Confirmed::Refused(reason) => {
                    ShardMetrics::inc(&self.metrics.sends_refused_total);
                    encode_server(
                        &ServerFrame::error(v2::error_for_reason(reason.as_bytes()), cf.client),
                        &mut out,
                    );
                }
            }
            if let Some(c) = &c {
                c.unconfirmed_done(self);
            }
        }
        if let Some(c) = c {
            c.write_native(self, &out);
        }
    }

    /// A connection's queued output went from `old` to `new` bytes.
    pub fn output_queued_changed(&self, old: usize, new: usize) {
        debug_assert!(
            old <= self.output_queued.get(),
            "a queue counted that the sum lacks"
        );
        let total = self.output_queued.get().saturating_sub(old) + new;
        self.output_queued.set(total);
        ShardMetrics::set(&self.metrics.output_queued_bytes, total as u64);
        if new > old && total > self.cfg.max_output_bytes_per_shard {
            self.output_sweep.notify();
        }
    }

    /// Keeps the output queued for the shard's connections under `max_output_bytes_per_shard`:
    /// each client's queue is bounded by `max_output_bytes`, but thousands of clients that stop
    /// reading just below it would together hold gigabytes. When the sum goes over the bound,
    /// connections are closed as slow consumers (their unacked messages stay stored) until the
    /// sum is under seven eighths of it: first those whose socket took nothing for
    /// [`conn::OUTPUT_STUCK`], largest first, then the largest of the others (a login storm
    /// whose drains are read promptly is cut only when it alone is over the bound). At most
    /// one pass every 10 ms.
    async fn output_budget_keeper(self: Rc<Self>) {
        let budget = self.cfg.max_output_bytes_per_shard;
        loop {
            self.output_sweep.wait().await;
            if self.output_queued.get() > budget {
                // Stuck queues first (the socket took nothing for a second), then those still
                // being written; the largest first within each.
                type Key = (bool, std::cmp::Reverse<usize>);
                let mut held: Vec<(Key, Rc<ConnShared>)> = self
                    .conns
                    .borrow()
                    .values()
                    .map(|c| {
                        let (n, stuck) = c.queued_out();
                        ((!stuck, std::cmp::Reverse(n)), c.clone())
                    })
                    .filter(|&((_, std::cmp::Reverse(n)), _)| n > 0)
                    .collect();
                held.sort_unstable_by_key(|&(key, _)| key);
                let mut closed = 0usize;
                for (_, c) in held {
                    if self.output_queued.get() <= budget - budget / 8 {
                        break;
                    }
                    c.disconnect_over_budget(&self);
                    closed += 1;
                }
                debug!(
                    shard = self.id,
                    closed,
                    queued = self.output_queued.get(),
                    "output over max_output_bytes_per_shard: stuck and largest queues closed"
                );
                if crate::metrics::first_time(&LOGGED_OUTPUT_BUDGET) {
                    warn!(
                        shard = self.id,
                        max_output_bytes_per_shard = budget,
                        "the shard's queued output went over max_output_bytes_per_shard: the \
                         connections holding the most were closed as slow consumers (logged \
                         once; iris_edge_output_budget_disconnects_total counts them)"
                    );
                }
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// Sends `m` to shard `to` (handled inline when `to` is this shard).
    pub fn send_shard(self: &Rc<Self>, to: usize, m: ShardMsg) {
        if to == self.id {
            self.handle_mesh(m);
        } else {
            let mut ob = self.outbox[to].borrow_mut();
            let b = &self.outbox_bytes[to];
            b.set(b.get() + ring_cost(&m));
            ob.push(m);
            if ob.len() == 1 {
                self.outbox_notify[to].notify();
            }
        }
    }

    /// Hands a request to the core without ever waiting: if the core's queue is full the request
    /// waits in the shard's backlog (kept in order) and connections stop reading until it drains.
    pub fn push_core(&self, req: CoreRequest) {
        let mut backlog = self.core_backlog.borrow_mut();
        if backlog.is_empty() {
            match self.core.to_core.try_send(req) {
                Ok(()) => {
                    if self.core.to_core.len() >= CORE_QUEUE_WAKE {
                        self.wake_core();
                    }
                    return;
                }
                Err(TrySendError::Full(r)) | Err(TrySendError::Disconnected(r)) => {
                    backlog.push_back(Backlogged::Req(r))
                }
            }
        } else {
            backlog.push_back(Backlogged::Req(req));
        }
        ShardMetrics::set(&self.metrics.core_backlog, backlog.len() as u64);
        self.core_notify.notify();
    }

    /// A request with a reply is handed to the core (see [`Shard::replies_full`]); the core is
    /// woken for it (stores and acks alone wait for the core's commit window).
    pub fn push_core_with_reply(&self, req: CoreRequest) {
        let mut p = self.pending_replies.borrow_mut();
        p.push_back(std::time::Instant::now());
        ShardMetrics::set(&self.metrics.pending_replies, p.len() as u64);
        drop(p);
        self.push_core(req);
        self.wake_core();
    }

    /// Rings the embedded core out of its commit-window sleep (never blocks).
    fn wake_core(&self) {
        if let Some(w) = &self.core.wake_core {
            let _ = w.try_send(());
        }
    }

    /// True while `max_pending_replies` requests with a reply wait for the core: the
    /// connections decode no more of them and read nothing (a 12-byte FETCH_PREKEYS brings back
    /// up to 8 KiB). A reply lost on the bus is forgotten after [`REPLY_FORGET`].
    pub fn replies_full(&self) -> bool {
        let mut p = self.pending_replies.borrow_mut();
        if !p.is_empty() {
            // (Every connection asks at every wake-up: no clock read while nothing waits.)
            let now = std::time::Instant::now();
            while p
                .front()
                .is_some_and(|&t| now.duration_since(t) > REPLY_FORGET)
            {
                p.pop_front();
            }
        }
        let full = p.len() >= self.cfg.max_pending_replies;
        if full && !self.replies_were_full.replace(true) {
            ShardMetrics::inc(&self.metrics.reply_backpressure_total);
            if crate::metrics::first_time(&LOGGED_REPLIES_FULL) {
                warn!(
                    shard = self.id,
                    max_pending_replies = self.cfg.max_pending_replies,
                    "max_pending_replies reached: connections stop reading until replies come \
                     back (logged once; iris_edge_reply_backpressure_total counts it)"
                );
            }
        } else if !full {
            self.replies_were_full.set(false);
        }
        full
    }

    fn reply_arrived(&self) {
        let mut p = self.pending_replies.borrow_mut();
        p.pop_front();
        ShardMetrics::set(&self.metrics.pending_replies, p.len() as u64);
    }

    /// The link's accept gate: while it is stalled (cluster: outbox bound or bus stall) the
    /// connections read nothing (see `conn.rs`).
    pub fn accept_gate(&self) -> &iris_core::outbox::AcceptGate {
        &self.core.gate
    }

    /// Requests waiting for room in the core's queue.
    pub fn core_backlog_len(&self) -> usize {
        self.core_backlog.borrow().len()
    }

    /// True while the core's queue or a peer's ring is backed up: connections stop reading
    /// (TCP backpressure to the senders) instead of letting the shard's queues grow.
    pub fn backpressured(&self) -> bool {
        self.core_backlog_len() >= CORE_BACKLOG_HIGH
            || self.core.to_core.len() >= CORE_QUEUE_HIGH
            || self.ring_bytes.load(Ordering::Relaxed) >= RING_BYTES_HIGH
            || self.outbox_bytes.iter().any(|b| b.get() >= OUTBOX_BYTES_HIGH)
            // Cluster: what was read is only in memory until the bridge writes it to the
            // outbox, so stop as soon as the link's (small) queue is full.
            || (self.cluster && (self.core.to_core.is_full() || self.core_backlog_len() > 0))
            || self.outbox.iter().any(|o| o.borrow().len() >= OUTBOX_HIGH)
            || self.replies_full()
    }

    /// Routes the live copy of a message just handed to the core ([`Shard::push_core`]): at
    /// once, unless its `Store` waits in the backlog; then right after it (see [`Backlogged`]).
    pub fn route_after_store(self: &Rc<Self>, to: &[u8], d: Delivery) {
        {
            let mut backlog = self.core_backlog.borrow_mut();
            if !backlog.is_empty() {
                backlog.push_back(Backlogged::Route(to.to_vec(), d));
                return;
            }
        }
        self.route(to, d);
    }

    /// Routes a delivery to every session of `to`, wherever it is.
    pub fn route(self: &Rc<Self>, to: &[u8], d: Delivery) {
        self.route_via(to, d, Via::Local);
    }

    /// [`Self::route`] for a delivery that came `via` (see [`Shard::route_owned`]).
    fn route_via(self: &Rc<Self>, to: &[u8], d: Delivery, via: Via) {
        let owner = owner_of(to, self.nshards);
        self.send_shard(
            owner,
            ShardMsg::Route {
                to: to.to_vec(),
                d,
                via,
            },
        );
    }

    /// Handles one ring message (or a local one).
    pub fn handle_mesh(self: &Rc<Self>, m: ShardMsg) {
        match m {
            ShardMsg::Route { to, d, via } => self.route_owned(to, d, via),
            ShardMsg::Deliver { conn, user, d } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    let id = d.id;
                    let live = &self.metrics.messages_delivered_live_total;
                    let before = live.load(Ordering::Relaxed);
                    c.deliver(self, &user, d);
                    if let Some(id) = id.filter(|_| live.load(Ordering::Relaxed) != before) {
                        self.metrics.hops.written.record_id(id);
                    }
                }
            }
            ShardMsg::Register { user, shard, conn } => {
                let (first, clean) = {
                    let mut p = self.presence.borrow_mut();
                    let first = !p.is_local(&user);
                    let clean = !self.cluster && p.take_clean(&user);
                    p.register(&user, shard, conn);
                    ShardMetrics::set(&self.metrics.presence_users, p.users_len() as u64);
                    (first, clean)
                };
                if first && self.cluster {
                    // Before `Registered`: the session is announced ahead of the login drain.
                    self.push_core(CoreRequest::Online {
                        user: user.clone(),
                        shard,
                    });
                }
                if self.cluster {
                    // A new session: the streams to `user` start over (its senders' edges may
                    // start sending direct copies only now).
                    let held = self.gate.borrow_mut().reset_user(&user);
                    for d in held {
                        self.route_owned(user.clone(), d, Via::Direct);
                    }
                }
                self.send_shard(shard, ShardMsg::Registered { user, conn, clean });
            }
            ShardMsg::Registered { user, conn, clean } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    c.start_drain(self, &user, clean);
                }
            }
            ShardMsg::Unregister {
                user,
                shard,
                conn,
                drained_empty,
            } => {
                let now = crate::idgen::now_micros() / 1_000_000;
                let last = {
                    let mut p = self.presence.borrow_mut();
                    let was = p.is_local(&user);
                    p.unregister(&user, shard, conn, now, drained_empty && !self.cluster);
                    ShardMetrics::set(&self.metrics.presence_users, p.users_len() as u64);
                    ShardMetrics::set(
                        &self.metrics.presence_last_seen_users,
                        p.last_seen_len() as u64,
                    );
                    was && !p.is_local(&user)
                };
                if last && self.cluster {
                    self.push_core(CoreRequest::Offline {
                        user,
                        last_seen: now,
                    });
                }
            }
            ShardMsg::StatusQuery { user, shard, conn } => {
                let (online, last_seen) = self.presence.borrow().status(&user);
                let mut f = Vec::with_capacity(user.len() + 12);
                frame::encode_status(&mut f, &user, online, last_seen);
                self.send_shard(shard, ShardMsg::StatusReply { conn, frame: f });
            }
            ShardMsg::StatusReply { conn, frame } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    c.write_frame(self, &frame);
                }
            }
        }
    }

    /// The owner's half of routing: hands `d` to every session of `to` on this edge.
    ///
    /// In a cluster, a delivery accepted here (`Via::Local`) also goes straight to every other
    /// edge the presence topic shows holding `to` ([`CoreRequest::Forward`] for a message,
    /// [`CoreRequest::ForwardRelay`] for a relay), one broker hop, while the stored copy goes
    /// to the core. A message reaches an edge up to twice (the direct copy and the core's, in
    /// either order, or the local fast path and the core's): the owner remembers each id it
    /// routed with the presence generation of that moment, and a later copy is written only to
    /// sessions registered since (none, usually: the copy is dropped and counted).
    fn route_owned(self: &Rc<Self>, to: Vec<u8>, d: Delivery, via: Via) {
        if d.id.is_some() && !self.cluster {
            // Before any session is looked up: see presence's "Known empty inboxes".
            self.presence.borrow_mut().stored_routed(&to);
        }
        let from_bus = via != Via::Local;
        let mut forwarded = false;
        if self.direct_live && !from_bus {
            // The predecessor of a message's direct copies: the last one the same sending shard
            // sent to `to`, whichever way it went.
            let prev =
                d.id.map_or(0, |id| self.last_sent.borrow_mut().swap(&to, id));
            let nodes = self.presence.borrow().remote_nodes(&to);
            forwarded = !nodes.is_empty();
            for node in nodes {
                self.forward(node, &to, &d, prev);
            }
        }
        // Sessions registered after this presence generation get the delivery (0: all).
        let mut after = 0;
        let mut remember = None;
        if let (true, Some(id)) = (self.cluster, d.id) {
            let generation = self.presence.borrow().generation();
            let mut recent = self.recent_routed.borrow_mut();
            if let Some(seen) = recent.get(id) {
                if generation == seen {
                    // No session registered since the first copy: nothing left to write.
                    ShardMetrics::inc(&self.metrics.bus_duplicates_suppressed_total);
                    return;
                }
                after = seen;
            }
            remember = Some((id, generation));
        }
        let sessions = self.presence.borrow().sessions_after(&to, after);
        if sessions.is_empty() {
            if after > 0 {
                ShardMetrics::inc(&self.metrics.bus_duplicates_suppressed_total);
            } else if d.id.is_some() {
                ShardMetrics::inc(&self.metrics.messages_live_offline_total);
            } else if self.cluster && !from_bus && !forwarded {
                // Not connected here and no other edge known: the core relays it to the edge
                // that holds `to`, if any.
                self.push_core(CoreRequest::Relay {
                    recipient: to,
                    frame: d.frame,
                });
            }
            return;
        }
        if let Some((id, generation)) = remember {
            self.recent_routed.borrow_mut().insert(id, generation);
        }
        match sessions.as_slice() {
            [(shard, conn)] => self.send_shard(
                *shard,
                ShardMsg::Deliver {
                    conn: *conn,
                    user: to,
                    d,
                },
            ),
            many => {
                for &(shard, conn) in many {
                    let d = Delivery {
                        id: d.id,
                        frame: d.frame.clone(),
                        meta: d.meta,
                    };
                    self.send_shard(
                        shard,
                        ShardMsg::Deliver {
                            conn,
                            user: to.clone(),
                            d,
                        },
                    );
                }
            }
        }
    }

    /// Writes the held direct copies for `to` whose predecessor is done now, in order.
    fn release_ready(self: &Rc<Self>, to: &[u8]) {
        while self.gate.borrow().holds(to) {
            let next = {
                let recent = self.recent_routed.borrow();
                self.gate
                    .borrow_mut()
                    .next_ready(to, std::time::Instant::now(), |p| recent.contains(p))
            };
            match next {
                Some(d) => self.route_owned(to.to_vec(), d, Via::Direct),
                None => break,
            }
        }
    }

    /// Sends the live copy of `d` for `to` straight to edge `node`'s inbox; `prev` is the
    /// previous message of its sending shard to `to` (see [`OrderGate`]).
    fn forward(&self, node: u32, to: &[u8], d: &Delivery, prev: u64) {
        let req = match d.id {
            Some(id) => {
                let Some(payload) = reliable_payload(d.v1_frame()) else {
                    return;
                };
                CoreRequest::Forward {
                    node,
                    recipient: to.to_vec(),
                    id,
                    prev,
                    sender: d.sender().to_vec(),
                    payload: payload.to_vec(),
                    kind: d.meta.kind,
                }
            }
            None => CoreRequest::ForwardRelay {
                node,
                recipient: to.to_vec(),
                frame: d.frame.clone(),
            },
        };
        ShardMetrics::inc(&self.metrics.bus_forwards_out_total);
        self.push_core(req);
    }

    fn handle_core(self: &Rc<Self>, r: CoreReply) {
        match r {
            CoreReply::Drain {
                conn,
                user,
                msgs,
                more,
                complete,
            } => {
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    c.drain_chunk(self, &user, msgs, more, complete);
                }
            }
            CoreReply::Confirms { conn, confirms } => self.confirmed(conn, confirms),
            CoreReply::Refused { conn, reason } => {
                ShardMetrics::inc(&self.metrics.sends_refused_total);
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    c.write_frame(self, &conn::error_frame(reason));
                }
            }
            CoreReply::Prekeys { conn, bundle, .. } => {
                self.reply_arrived();
                let c = self.conns.borrow().get(&conn).cloned();
                if let Some(c) = c {
                    let body = bundle
                        .as_deref()
                        .unwrap_or(crate::protocol::cbor::NOT_FOUND_BUNDLE);
                    let mut f = Vec::with_capacity(body.len() + 5);
                    frame::encode_prekey_response(&mut f, body);
                    c.write_frame(self, &f);
                }
            }
            CoreReply::Deliver {
                recipient,
                id,
                sender,
                payload,
                direct,
                prev,
                kind,
            } => {
                let via = if direct {
                    self.metrics.hops.inbox_direct.record_id(id);
                    ShardMetrics::inc(&self.metrics.bus_direct_in_total);
                    Via::Direct
                } else {
                    self.metrics.hops.inbox_core.record_id(id);
                    ShardMetrics::inc(&self.metrics.bus_delivers_in_total);
                    Via::Core
                };
                // The v1 frame, then the sender's name for v2 recipients (see `Delivery::frame`).
                let sender_len = u16::try_from(sender.len()).unwrap_or(0);
                let mut f = Vec::with_capacity(payload.len() + 23 + usize::from(sender_len));
                frame::encode_reliable(&mut f, crate::protocol::MsgId(id), &payload);
                if sender_len > 0 {
                    f.extend_from_slice(&sender);
                }
                let d = Delivery {
                    id: Some(id),
                    frame: f,
                    meta: Meta {
                        sender_len,
                        kind: v2::resolve_kind(kind, &payload),
                    },
                };
                let now = std::time::Instant::now();
                if via == Via::Direct {
                    let d = {
                        let recent = self.recent_routed.borrow();
                        self.gate
                            .borrow_mut()
                            .on_direct(&recipient, d, prev, now, |p| recent.contains(p))
                    };
                    if let Some(d) = d {
                        self.route_owned(recipient.clone(), d, via);
                    }
                } else {
                    self.gate.borrow_mut().on_core(&recipient, id, now);
                    self.route_owned(recipient.clone(), d, via);
                }
                self.release_ready(&recipient);
            }
            CoreReply::Relay { recipient, frame } => {
                self.route_owned(recipient, Delivery::relay(frame), Via::Core)
            }
            CoreReply::Presence {
                user,
                node,
                online,
                unix_ms,
            } => self
                .presence
                .borrow_mut()
                .remote_event(&user, node, online, unix_ms),
            CoreReply::EdgeReset { node, unix_ms } => {
                self.presence.borrow_mut().reset_node(node, unix_ms)
            }
        }
    }

    /// Moves backlog to the core and core replies to connections. While busy it loops; idle, it
    /// sleeps until the core (or the cluster's bridge) rings its bell (glommio takes wake-ups
    /// from the core's thread), a connection backlogs a request, or housekeeping is due
    /// ([`Shard::park_on_core`]). Only a cluster edge with requests in its backlog polls
    /// instead, backing off from 50 µs to 1 ms (see the loop).
    async fn core_poller(self: Rc<Self>) {
        let mut idle = Duration::from_micros(50);
        let mut last_collect = std::time::Instant::now();
        let mut bytes_at_collect = u64::MAX;
        loop {
            let mut busy = false;
            let mut routes = Vec::new();
            {
                let mut backlog = self.core_backlog.borrow_mut();
                while let Some(item) = backlog.pop_front() {
                    let req = match item {
                        Backlogged::Req(req) => req,
                        Backlogged::Route(to, d) => {
                            // Its Store is in the core's queue now.
                            routes.push((to, d));
                            continue;
                        }
                    };
                    match self.core.to_core.try_send(req) {
                        Ok(()) => busy = true,
                        Err(TrySendError::Full(r)) => {
                            backlog.push_front(Backlogged::Req(r));
                            break;
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            // The core thread is dead: what the backlog holds can never be
                            // stored. Fatal, like any dead thread (see server.rs).
                            tracing::error!(
                                shard = self.id,
                                backlog = backlog.len(),
                                "the core is gone: the edge stops"
                            );
                            std::process::exit(crate::server::DEAD_THREAD_EXIT);
                        }
                    }
                }
                ShardMetrics::set(&self.metrics.core_backlog, backlog.len() as u64);
            }
            for (to, d) in routes {
                busy = true;
                self.route(&to, d);
            }
            if self.cluster {
                let expired = self.gate.borrow_mut().expired(std::time::Instant::now());
                for (user, held) in expired {
                    busy = true;
                    for d in held {
                        self.route_owned(user.clone(), d, Via::Direct);
                    }
                }
            }
            let mut n = 0;
            while let Ok(r) = self.core.from_core.try_recv() {
                self.handle_core(r);
                busy = true;
                n += 1;
                if n >= 256 {
                    break;
                }
            }
            if busy {
                idle = Duration::from_micros(50);
                futures_lite::future::yield_now().await;
            } else {
                if self.shutting_down.get()
                    && self.conns.borrow().is_empty()
                    && self.core_backlog.borrow().is_empty()
                {
                    // No other thread may hold this task's waker once it is gone.
                    self.core.bell.clear();
                    return;
                }
                if last_collect.elapsed() >= Duration::from_secs(1) {
                    // No client bytes for a second: hand the pages freed by the last burst back.
                    let bytes = self
                        .metrics
                        .bytes_in_total
                        .load(std::sync::atomic::Ordering::Relaxed);
                    if bytes == bytes_at_collect {
                        crate::alloc::collect_idle_heap();
                    }
                    bytes_at_collect = bytes;
                    last_collect = std::time::Instant::now();
                }
                if self.cluster && !self.core_backlog.borrow().is_empty() {
                    // The link's queue is full: the bridge takes from it without ringing, so
                    // look again shortly rather than spin.
                    glommio::timer::sleep(idle).await;
                    idle = (idle * 2).min(Duration::from_millis(1));
                } else {
                    // Sleep until the core (or the cluster's bridge) rings with replies, a
                    // connection backlogs a request, or housekeeping is due: no timer wake-ups
                    // while traffic is sparse. The housekeeping wake-up also releases the
                    // direct-copy gate's held copies, whose wait (15 s) it serves well enough.
                    self.park_on_core().await;
                }
                // The executor sleeps only while this task is parked (a busy poller yields and
                // stays runnable), so the count is published here, off the busy path.
                ShardMetrics::set(
                    &self.metrics.shard_sleeps_total,
                    glommio::executor().sleeps(),
                );
            }
        }
    }

    /// Waits for the core's bell, the backlog's notify, or [`POLLER_HOUSEKEEPING`]. With
    /// requests in the backlog it waits for room in the core's queue: the core rings once it
    /// has taken from it ([`ShardBell::want_room`](iris_core::api::ShardBell::want_room)).
    /// (Returning at once whenever the backlog held requests made the poller spin, without
    /// yielding to the connections, for as long as the core's queue stayed full.)
    async fn park_on_core(&self) {
        let bell = &self.core.bell;
        let rung = std::future::poll_fn(|cx| {
            let backlogged = !self.core_backlog.borrow().is_empty();
            if backlogged {
                bell.want_room();
            }
            bell.park(cx.waker());
            if !self.core.from_core.is_empty() || (backlogged && !self.core.to_core.is_full()) {
                bell.unpark();
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        futures_lite::future::or(
            futures_lite::future::or(rung, self.core_notify.wait()),
            glommio::timer::sleep(POLLER_HOUSEKEEPING),
        )
        .await;
        bell.unpark();
    }

    async fn ring_writer(self: Rc<Self>, senders: Rc<Senders<Batch>>, peer: usize) {
        loop {
            let batch = std::mem::take(&mut *self.outbox[peer].borrow_mut());
            if batch.is_empty() {
                self.outbox_notify[peer].wait().await;
                continue;
            }
            // The bytes move from this outbox to the rings (handed back by the receiver).
            let bytes = self.outbox_bytes[peer].replace(0);
            self.ring_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            ShardMetrics::inc(&self.metrics.ring_batches_out_total);
            ShardMetrics::add(&self.metrics.ring_items_out_total, batch.len() as u64);
            if senders.send_to(peer, batch).await.is_err() {
                debug!(shard = self.id, peer, "ring closed");
                return;
            }
        }
    }

    async fn accept_loop(
        self: Rc<Self>,
        listener: TcpListener,
        proto: v2::Proto,
        kind: transport::Kind,
        certs: Option<Rc<crate::tls::ShardCerts>>,
    ) {
        loop {
            match listener.accept_with_peer().await {
                Ok((stream, peer)) => {
                    let peer = peer.map(|a| a.ip());
                    if self.shutting_down.get() {
                        return;
                    }
                    ShardMetrics::inc(&self.metrics.connections_accepted_total);
                    let id = self.next_conn_id();
                    if kind == transport::Kind::Tcp {
                        glommio::spawn_local(conn::run(
                            self.clone(),
                            stream.into(),
                            id,
                            proto,
                            peer,
                        ))
                        .detach();
                    } else {
                        // The handshakes run in the connection's own task.
                        let config = certs.as_ref().map(|c| c.current());
                        glommio::spawn_local(
                            self.clone().handshake(stream, kind, config, id, peer),
                        )
                        .detach();
                    }
                }
                Err(e) => {
                    ShardMetrics::inc(&self.metrics.accept_errors_total);
                    warn!(shard = self.id, error = %e, "accept failed; pausing 10 ms");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

impl Shard {
    /// TLS and/or WebSocket handshakes of an accepted v2 connection, then its session.
    async fn handshake(
        self: Rc<Self>,
        stream: glommio::net::TcpStream,
        kind: transport::Kind,
        config: Option<Arc<rustls::ServerConfig>>,
        id: ConnId,
        peer: Option<std::net::IpAddr>,
    ) {
        let ws = transport::ws_config(
            self.cfg.v2.max_frame_bytes,
            self.cfg.v2.ws_read_buffer_bytes,
        );
        let timeout = Duration::from_millis(self.cfg.login_timeout_ms);
        // Boxed: the handshakes' state (about 32 KB, most of it the WebSocket upgrade's) is
        // freed once they are done instead of staying in this task for the connection's life.
        let accepted = Box::pin(transport::accept(stream, kind, config, ws, timeout)).await;
        match accepted {
            Ok(t) => {
                if self.shutting_down.get() {
                    return;
                }
                let m = &self.metrics;
                ShardMetrics::inc(match kind {
                    transport::Kind::Tls => &m.v2_tls_connections_accepted_total,
                    transport::Kind::Ws => &m.v2_ws_connections_accepted_total,
                    _ => &m.v2_wss_connections_accepted_total,
                });
                if t.tls_resumed() {
                    ShardMetrics::inc(&m.tls_handshakes_resumed_total);
                }
                conn::run(self, t, id, v2::Proto::V2, peer).await;
            }
            Err(e) => {
                ShardMetrics::inc(if e.is_tls() {
                    &self.metrics.tls_handshakes_failed_total
                } else {
                    &self.metrics.ws_handshakes_failed_total
                });
                debug!(shard = self.id, conn = id, error = %e, "handshake failed");
            }
        }
    }
}

/// What a shard needs to start, built on the main thread and moved into the executor.
pub struct ShardStart {
    pub id: usize,
    pub nshards: usize,
    pub cfg: Arc<EdgeConfig>,
    pub metrics: Arc<ShardMetrics>,
    pub core: ShardLink,
    pub id_floor: u64,
    /// The id high-water mark shared by every shard of the edge (`idgen.rs`).
    pub id_high: Arc<HighWater>,
    pub listener_fd: std::os::fd::OwnedFd,
    /// The protocol v2 listener, when `[v2] listen` is set.
    pub v2_listener_fd: Option<std::os::fd::OwnedFd>,
    /// The v2 TLS, WebSocket and WebSocket-over-TLS listeners, when configured.
    pub v2_transports: transport::Listeners,
    pub mesh: Option<MeshBuilder<Batch, Full>>,
    pub shutdown: Arc<AtomicBool>,
    /// Told this shard's id once it accepts connections.
    pub ready: std::sync::mpsc::Sender<usize>,
    /// Bytes on the rings of the whole edge, one counter shared by every shard.
    pub ring_bytes: Arc<AtomicU64>,
    /// Told this shard's id when it returns (the main thread's watchdog, see `server.rs`).
    pub exited: std::sync::mpsc::Sender<usize>,
}

/// Tells the watchdog that the shard returned, however it returns.
struct ExitNotice(std::sync::mpsc::Sender<usize>, usize);

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

/// Testing aid: `IRIS_EDGE_FAULT_PANIC_SHARD=N` makes shard `N` panic one second after it starts
/// serving, to show that a dead shard stops the process (tests/tests/dead_thread.rs).
fn fault_panic_requested(id: usize) -> bool {
    std::env::var("IRIS_EDGE_FAULT_PANIC_SHARD").is_ok_and(|v| v.trim() == id.to_string())
}

/// Runs one shard until shutdown; called inside its glommio executor.
pub async fn run(start: ShardStart) {
    let ShardStart {
        id,
        nshards,
        cfg,
        metrics,
        core,
        id_floor,
        id_high,
        listener_fd,
        v2_listener_fd,
        v2_transports,
        mesh,
        shutdown,
        ready,
        ring_bytes,
        exited,
    } = start;
    let _notice = ExitNotice(exited, id);
    let shard = Rc::new(Shard::new(
        id,
        nshards,
        cfg,
        metrics,
        core,
        (id_floor, id_high),
        ring_bytes,
    ));

    if let Some(mesh) = mesh {
        match mesh.join().await {
            Ok((senders, mut receivers)) => {
                let senders = Rc::new(senders);
                for peer in (0..nshards).filter(|&p| p != id) {
                    glommio::spawn_local(shard.clone().ring_writer(senders.clone(), peer)).detach();
                }
                for (peer, rx) in receivers.streams() {
                    let s = shard.clone();
                    glommio::spawn_local(async move {
                        while let Some(batch) = rx.recv().await {
                            let mut bytes = 0;
                            for m in batch {
                                bytes += ring_cost(&m);
                                s.handle_mesh(m);
                            }
                            s.ring_bytes.fetch_sub(bytes as u64, Ordering::Relaxed);
                        }
                        debug!(shard = s.id, peer, "ring reader done");
                    })
                    .detach();
                }
            }
            Err(e) => {
                warn!(shard = id, error = %e, "could not join the shard mesh");
                return;
            }
        }
    }

    let poller = glommio::spawn_local(shard.clone().core_poller());
    let budget_keeper = glommio::spawn_local(shard.clone().output_budget_keeper()).detach();
    // SAFETY: `OwnedFd` guarantees the descriptor is open and owned by us; `into_raw_fd` gives
    // that ownership up, and `from_raw_fd` takes it, so exactly one owner closes it. It is a
    // bound, listening TCP socket created for this shard alone.
    let listener = unsafe { TcpListener::from_raw_fd(listener_fd.into_raw_fd()) };
    let tcp = transport::Kind::Tcp;
    let accept = glommio::spawn_local(shard.clone().accept_loop(
        listener,
        v2::Proto::V1,
        tcp,
        None,
    ))
    .detach();
    let certs = v2_transports
        .certs
        .map(|c| Rc::new(crate::tls::ShardCerts::new(c)));
    let mut accept_v2 = Vec::new();
    for (fd, kind) in [
        (v2_listener_fd, tcp),
        (v2_transports.tls, transport::Kind::Tls),
        (v2_transports.ws, transport::Kind::Ws),
        (v2_transports.wss, transport::Kind::Wss),
    ] {
        let Some(fd) = fd else { continue };
        // SAFETY: as above: an owned, bound, listening TCP socket of this shard alone, whose
        // single ownership passes from the `OwnedFd` to the listener.
        let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
        let certs = certs.clone();
        let task = shard
            .clone()
            .accept_loop(listener, v2::Proto::V2, kind, certs);
        accept_v2.push(glommio::spawn_local(task).detach());
    }
    let batch_wait = glommio::executor().batch_wait_active();
    info!(
        shard = id,
        batch_wait_us = shard.cfg.batch_wait_us,
        batch_wait,
        "shard started"
    );
    if shard.cfg.batch_wait_us > 0 && !batch_wait {
        warn!(
            shard = id,
            batch_wait_us = shard.cfg.batch_wait_us,
            "this kernel has no batch wait (Linux 6.12): the shard wakes at each event \
             (batch_wait_us = 0 says so and silences this)"
        );
    }
    let _ = ready.send(id);
    drop(ready);
    if fault_panic_requested(id) {
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            panic!("IRIS_EDGE_FAULT_PANIC_SHARD: shard {id} panics on request");
        })
        .detach();
    }

    while !shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    info!(shard = id, "shard draining");
    shard.shutting_down.set(true);
    accept.cancel();
    for a in accept_v2 {
        a.cancel();
    }
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for c in &conns {
        c.begin_shutdown();
    }
    let deadline = Duration::from_millis(shard.cfg.drain_timeout_ms);
    let waited = glommio::timer::timeout(deadline, async {
        while !shard.conns.borrow().is_empty() {
            shard.conns_empty.wait().await;
        }
        Ok(())
    })
    .await;
    if waited.is_err() {
        let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
        for c in &conns {
            c.force_close();
        }
        while !shard.conns.borrow().is_empty() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
    budget_keeper.cancel();
    // Everything the connections produced is in the backlog or the core's queue now.
    poller.await;
    info!(shard = id, "shard stopped");
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64) -> Delivery {
        Delivery {
            id: Some(id),
            frame: Vec::new(),
            meta: Meta::default(),
        }
    }

    fn ids(v: &[Delivery]) -> Vec<u64> {
        v.iter().filter_map(|d| d.id).collect()
    }

    /// Recent ids of one sending shard (origin 5): its clock `n` ticks (16 µs) after a recent
    /// time.
    fn id(n: u64) -> u64 {
        static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let base = *BASE.get_or_init(|| {
            iris_bus::hops::unix_micros() - iris_bus::hops::ID_EPOCH_MICROS - 1_000_000
        });
        ((base / iris_bus::hops::ID_TICK_MICROS + n) << iris_bus::hops::ID_LOW_BITS) | 5
    }

    fn none(_: u64) -> bool {
        false
    }

    #[test]
    fn direct_copies_wait_for_their_predecessor() {
        let mut g = OrderGate::default();
        let t = std::time::Instant::now();
        // 1 and 2 went through the core only; 3 and 4 also directly, and come first.
        assert!(g.on_direct(b"u", msg(id(3)), id(2), t, none).is_none());
        assert!(
            g.on_direct(b"u", msg(id(4)), id(3), t, none).is_none(),
            "behind 3"
        );
        assert_eq!(g.held, 2);
        assert!(g.holds(b"u") && !g.holds(b"x"));
        // Another sending shard's stream is not held back by these.
        let other = id(9) + 1;
        assert!(g.on_direct(b"u", msg(other), 0, t, none).is_some());
        g.on_core(b"u", id(1), t);
        assert!(g.next_ready(b"u", t, none).is_none());
        // The core passes 2: 3 may go, then 4 (its predecessor 3 is written by then).
        g.on_core(b"u", id(2), t);
        assert_eq!(g.next_ready(b"u", t, none).and_then(|d| d.id), Some(id(3)));
        assert!(g.next_ready(b"u", t, none).is_none(), "3 not written yet");
        let written = |p: u64| p == id(3);
        assert_eq!(
            g.next_ready(b"u", t, written).and_then(|d| d.id),
            Some(id(4))
        );
        assert_eq!(g.held, 0);
        // A lost direct copy (5): 6 waits until 5 is written (its core copy).
        assert!(g.on_direct(b"u", msg(id(6)), id(5), t, written).is_none());
        assert_eq!(
            g.next_ready(b"u", t, |p| p == id(5)).and_then(|d| d.id),
            Some(id(6))
        );
        // A predecessor older than the horizon counts as written.
        let old = ((iris_bus::hops::unix_micros() - iris_bus::hops::ID_EPOCH_MICROS - 60_000_000)
            << 14)
            | 5;
        assert!(g.on_direct(b"v", msg(id(7)), old, t, none).is_some());
    }

    #[test]
    fn held_copies_are_released_by_time_or_a_new_session() {
        let mut g = OrderGate::default();
        let t = std::time::Instant::now();
        assert!(g.on_direct(b"u", msg(id(3)), id(2), t, none).is_none());
        let later = t + Duration::from_millis(500);
        assert!(g.on_direct(b"x", msg(id(8)), id(7), later, none).is_none());
        assert!(g.expired(t + Duration::from_millis(1500)).is_empty());
        let out = g.expired(t + DIRECT_HOLD_MAX);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0.as_slice(), ids(&out[0].1)),
            (&b"u"[..], vec![id(3)])
        );
        assert_eq!(ids(&g.reset_user(b"x")), vec![id(8)]);
        assert_eq!(g.held, 0);
        assert!(g.expired(t + Duration::from_secs(5)).is_empty());
        // Idle streams are forgotten.
        let _ = g.expired(t + STREAM_IDLE * 3);
        assert!(g.users.is_empty());
    }

    #[test]
    fn the_sender_names_each_message_predecessor() {
        let mut l = LastSent::default();
        assert_eq!(l.swap(b"u", id(1)), 0);
        assert_eq!(l.swap(b"u", id(2)), id(1));
        assert_eq!(l.swap(b"v", id(3)), 0, "per recipient");
        assert_eq!(l.swap(b"u", id(4) + 1), 0, "per sending shard");
        assert_eq!(l.swap(b"u", id(5)), id(2));
    }

    #[test]
    fn owner_hash_matches_the_bus_partitioner() {
        // The same FNV-1a 64 as `iris_bus::topics::user_hash`: hash("alice") = 0x508b2abb65a03907.
        assert_eq!(owner_of(b"alice", 4), 3);
        assert_eq!(owner_of(b"alice", 1), 0);
        assert_eq!(owner_of(b"", 7), (0xcbf2_9ce4_8422_2325u64 % 7) as usize);
    }
}
