//! The types that cross between edge shards and the core.
//!
//! Every edge shard owns one [`ShardLink`]: a bounded queue of [`CoreRequest`]s towards the core
//! and a bounded queue of [`CoreReply`]s back. Each queue has exactly one producer and one
//! consumer (SPSC use of crossbeam channels), so a shard never contends with another shard.
//!
//! Neither side polls the other on a timer. The core rings the shard's [`ShardBell`] after it
//! queued replies (glommio executors accept wake-ups from foreign threads); a shard rings the
//! embedded core's `wake_core` only for a request that needs a prompt answer (a drain, a prekey
//! fetch) or when its queue fills, so stores and acks reach the core in batches, one wake-up per
//! commit window at most, instead of one per message.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Instant;

use crossbeam::channel::{Receiver, Sender};

use crate::outbox::AcceptGate;

/// A message accepted by an edge, addressed to one recipient.
///
/// `id` is the server-chosen message id (unique, and increasing per sending shard); the store
/// keeps a recipient's messages ordered by it. `payload` is exactly what the recipient receives
/// inside its RELIABLE_MSG frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMsg {
    pub id: u64,
    pub recipient: Vec<u8>,
    pub sender: Vec<u8>,
    pub payload: Vec<u8>,
    /// The message's protocol v2 kind, stored with it so that a drained message reaches a v2
    /// recipient with the kind it was sent with: 0 plain (v1 SEND, BATCH_SEND, SEND_SEQ), 1 CBOR
    /// (v1 CBOR_MSG), 2 E2EE (`payload` is then the `0x24` inner frame v1 recipients get).
    /// [`KIND_UNRECORDED`] for a message stored before kinds were. v1 recipients never see it.
    pub kind: u8,
}

/// [`StoredMsg::kind`] / [`DrainedMsg::kind`] of a message stored by a build that kept no kind
/// (an inbox value of the store's version 1): the edge derives the kind from the payload (2 for
/// an E2EE inner frame, else 0), as it did before kinds were stored.
pub const KIND_UNRECORDED: u8 = u8::MAX;

/// The most message ids a [`CoreRequest::Delivered`] list holds: a v2 connection remembers the
/// ids it wrote, not yet acked, up to this many (the oldest are forgotten first).
pub const RESUME_IDS_MAX: usize = 1024;

/// Where a reply must go on the edge: the shard-local connection number.
pub type ConnId = u64;

/// One message of a [`CoreReply::Drain`], with its sender (as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainedMsg {
    pub id: u64,
    pub sender: Vec<u8>,
    pub payload: Vec<u8>,
    /// As stored: see [`StoredMsg::kind`].
    pub kind: u8,
}

/// The outcome of a store request that carried a client message id
/// ([`CoreRequest::Store`] `client`), told in a [`Confirm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Durable (fsynced), or acked by its recipient before it had to be written.
    Stored,
    /// (sender, client) was seen before: `Confirm::id` is the first message's id; this one was
    /// not stored. The first one is durable.
    Duplicate,
    /// Not stored, for this ASCII reason ([`REFUSED_INBOX_FULL`], [`REFUSED_STORE_FAILED`]).
    Refused(&'static str),
}

/// What became of one store request with client message id `client`: `id` is the server id
/// the sender is told (the first message's id for a [`Confirmed::Duplicate`]; the refused
/// message's own id for a [`Confirmed::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    pub client: u64,
    pub id: u64,
    pub outcome: Confirmed,
}

/// [`CoreReply::Refused`] reason: the recipient already has `max_messages_per_user` messages
/// or `max_bytes_per_user` payload bytes stored.
pub const REFUSED_INBOX_FULL: &str = "recipient_inbox_full";
/// [`CoreReply::Refused`] reason: the store could not write the message (disk full, I/O error).
pub const REFUSED_STORE_FAILED: &str = "store_unavailable";

/// The smallest message id still alive when messages live `ttl_secs` and the time is
/// `now_micros` (Unix µs): an id carries its accept time (`(µs since the id epoch / 16) << 18`),
/// so every id below this one was accepted more than `ttl_secs` ago. 0 (nothing expired) when
/// `ttl_secs` is 0 or the cutoff is before the id epoch.
pub fn min_live_id(now_micros: u64, ttl_secs: u64) -> u64 {
    use iris_bus::hops::{ID_EPOCH_MICROS, ID_LOW_BITS, ID_TICK_MICROS};
    if ttl_secs == 0 {
        return 0;
    }
    let cutoff = now_micros.saturating_sub(ttl_secs.saturating_mul(1_000_000));
    let ticks = cutoff.saturating_sub(ID_EPOCH_MICROS) / ID_TICK_MICROS;
    ticks
        .checked_shl(ID_LOW_BITS)
        .filter(|v| v >> ID_LOW_BITS == ticks)
        .unwrap_or(u64::MAX)
}

/// What an edge shard asks of the core. Never awaited on the shard's hot path.
#[derive(Debug)]
pub enum CoreRequest {
    /// Store a message until its recipient acks it. `conn` is the sender's shard-local
    /// connection: the embedded core answers it with [`CoreReply::Refused`] when the message is
    /// not stored (recipient over quota, failed write). The cluster link ignores it.
    ///
    /// `client`: a v2 sender's client message id (an idempotency key unique per sender). When
    /// `Some`, the embedded core answers [`CoreReply::Confirms`] for it instead of
    /// [`CoreReply::Refused`]: [`Confirmed::Stored`] once the message is durable,
    /// [`Confirmed::Duplicate`] (with the first message's id, and nothing stored) when
    /// `(msg.sender, client)` was seen before, and it remembers `(msg.sender, client) -> msg.id`
    /// durably (for `dedup_ttl_secs`). A cluster link sends `client` with the message to the
    /// recipient's home core, which does the same region-wide and answers through the bus
    /// (`Stored` or `Duplicate` only: the cluster core refuses nothing).
    ///
    /// `accepted`: when the edge accepted the message (read it from its sender). The embedded
    /// core writes a message not acked by then at most `commit_window_ms` after this instant
    /// (or after the end of the commit before it was taken in, if that is later; one that
    /// waited in a full queue to the core longer than the window is due the moment it is taken
    /// in); the cluster link ignores it.
    Store {
        msg: StoredMsg,
        conn: ConnId,
        client: Option<u64>,
        accepted: Instant,
    },
    /// The recipient acked message `id`: it is delivered and must never come again.
    Ack { user: Vec<u8>, id: u64 },
    /// Send up to `limit` of `user`'s undelivered messages with an id greater than `after`
    /// (0 = from the start), in id order, as one [`CoreReply::Drain`] to `conn`.
    /// Before serving a drain the core takes in every request already queued by any shard, so a
    /// message whose store request was queued before the drain request is always included.
    ///
    /// `resume_after`: a v2 HELLO's `resume_after` (0: none; only a session's first drain
    /// carries it). Before the drain, the core acks (as [`CoreRequest::Ack`] would) every id of
    /// the last [`CoreRequest::Delivered`] list of `user` that is ≤ `resume_after` and comes
    /// before `resume_after` itself in that list; nothing at all when `resume_after` is not in
    /// it (docs/PROTOCOL-v2.md, "resume_after"). The list is consumed.
    Drain {
        user: Vec<u8>,
        conn: ConnId,
        after: u64,
        limit: usize,
        resume_after: u64,
    },
    /// A v2 session of `user` ended: `ids` are the messages written to it, in the order they
    /// were written (the last [`RESUME_IDS_MAX`] at most, acked ones left out). The core keeps
    /// the latest list per user (a bounded number of users) for the next session's
    /// `resume_after` ([`CoreRequest::Drain`]).
    Delivered { user: Vec<u8>, ids: Vec<u64> },
    /// Store (replace) `user`'s E2EE prekey bundle (a CBOR map).
    PutPrekeys { user: Vec<u8>, bundle: Vec<u8> },
    /// Fetch `user`'s prekey bundle; answered with [`CoreReply::Prekeys`] to `conn`.
    FetchPrekeys { user: Vec<u8>, conn: ConnId },
    /// `user`'s first session on this edge began, on shard `shard` (sent by the user's presence
    /// owner). The embedded core needs nothing (presence is in the shards); the cluster link
    /// writes the session to Redis and announces it on the presence topic.
    Online { user: Vec<u8>, shard: usize },
    /// `user`'s last session on this edge ended at `last_seen` (Unix seconds); see
    /// [`CoreRequest::Online`].
    Offline { user: Vec<u8>, last_seen: u64 },
    /// A best-effort frame (typing 0x72, read receipt 0x75) for `recipient`, who has no session
    /// on this edge. The embedded core drops it (one box: not connected means offline); the
    /// cluster link hands it to the core, which relays it to the edge holding `recipient`.
    Relay { recipient: Vec<u8>, frame: Vec<u8> },
    /// Cluster only: the live copy of message `id` for `recipient`, whom the presence topic shows
    /// connected to edge `node` of this region (sent by the recipient's presence owner shard on
    /// the sender's edge, once per such node). The cluster link produces it straight to that
    /// edge's inbox (one broker hop) while the stored copy goes to the core as
    /// [`CoreRequest::Store`] (the fallback; the receiving edge writes whichever copy comes first
    /// and drops the other by id). `payload` is what the recipient receives inside its
    /// RELIABLE_MSG frame. `prev` is the id of the message the same sending shard (the low
    /// bits of the ids) sent to `recipient` before this one (0: none known), so the receiving
    /// edge keeps the sender's order when the two paths race. Best effort: never stored. The
    /// embedded core ignores it.
    Forward {
        node: u32,
        recipient: Vec<u8>,
        id: u64,
        prev: u64,
        sender: Vec<u8>,
        payload: Vec<u8>,
        /// The message's v2 kind ([`StoredMsg::kind`]).
        kind: u8,
    },
    /// Cluster only: a best-effort frame (typing 0x72, read receipt 0x75) for `recipient`, whom
    /// the presence topic shows connected to edge `node`: produced straight to that edge's inbox
    /// instead of through the core. The embedded core ignores it.
    ForwardRelay {
        node: u32,
        recipient: Vec<u8>,
        frame: Vec<u8>,
    },
}

/// What the core sends back to a shard.
#[derive(Debug)]
pub enum CoreReply {
    /// Answer to [`CoreRequest::Drain`]: messages in id order; `more` is true when further
    /// messages may follow `msgs.last()`. `complete` is false when the store could not be read
    /// (the messages there stay stored, for a later drain): an empty answer then says nothing
    /// about the inbox.
    Drain {
        conn: ConnId,
        user: Vec<u8>,
        msgs: Vec<DrainedMsg>,
        more: bool,
        complete: bool,
    },
    /// Answer to [`CoreRequest::FetchPrekeys`]; `None` when no bundle is stored.
    Prekeys {
        conn: ConnId,
        user: Vec<u8>,
        bundle: Option<Vec<u8>>,
    },
    /// Embedded core: a message sent on `conn` was not stored, for `reason` (an ASCII reason
    /// for the sender's `0xFE` frame: [`REFUSED_INBOX_FULL`], [`REFUSED_STORE_FAILED`]). Several
    /// refusals for one connection in one pass of the core come as one reply.
    Refused { conn: ConnId, reason: &'static str },
    /// What became of stores sent on `conn` with a client message id
    /// ([`CoreRequest::Store`] `client`), in the order the core settled them. Several confirms
    /// for one connection in one pass of the embedded core come as one reply; a cluster link
    /// hands over each `Confirmed` frame of the home core as it comes.
    Confirms {
        conn: ConnId,
        confirms: Vec<Confirm>,
    },
    /// Cluster only: message `id` for `recipient`, taken from this edge's inbox, where
    /// `recipient` has (or had) a session. Sent to the recipient's presence owner shard.
    /// `direct` tells the copy the sender's edge produced straight to this inbox
    /// ([`CoreRequest::Forward`], which also names the sender's previous message in `prev`)
    /// from the one the core stored and routed (`prev` 0). `sender` names the sender (for v2
    /// recipients' DELIVER).
    Deliver {
        recipient: Vec<u8>,
        id: u64,
        sender: Vec<u8>,
        payload: Vec<u8>,
        direct: bool,
        prev: u64,
        /// The message's v2 kind ([`StoredMsg::kind`]).
        kind: u8,
    },
    /// Cluster only: a best-effort frame relayed from another edge for `recipient`.
    Relay { recipient: Vec<u8>, frame: Vec<u8> },
    /// Cluster only: another edge `node` announced that `user` went online or offline at
    /// `unix_ms`. Sent to the user's presence owner shard.
    Presence {
        user: Vec<u8>,
        node: u32,
        online: bool,
        unix_ms: u64,
    },
    /// Cluster only: edge `node` (re)started at `unix_ms`; none of its earlier sessions are
    /// alive. Sent to every shard.
    EdgeReset { node: u32, unix_ms: u64 },
}

/// Wakes a shard's core poller (a glommio task) from the core's thread when replies wait.
///
/// The poller [`park`](Self::park)s with its waker, then checks its queue once more before it
/// sleeps; the core pushes a reply, then [`ring`](Self::ring)s. A full fence on both sides
/// between the flag and the queue makes a lost wake-up impossible: either the poller's last check
/// sees the reply, or the core's ring sees the flag.
///
/// The same bell serves a poller waiting for room in its full request queue (its backlog holds
/// requests): it says so with [`want_room`](Self::want_room) before it parks and checks the
/// queue; the core, after taking requests from that queue, calls
/// [`room_made`](Self::room_made), which rings only if room was wanted. The same fences make that
/// wake-up impossible to lose, and the poller sleeps instead of spinning on a full queue.
#[derive(Debug, Default)]
pub struct ShardBell {
    parked: AtomicBool,
    room_wanted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl ShardBell {
    /// Shard side: about to sleep with `w`; the caller checks its queue after this.
    pub fn park(&self, w: &Waker) {
        if let Ok(mut g) = self.waker.lock() {
            if !g.as_ref().is_some_and(|old| old.will_wake(w)) {
                *g = Some(w.clone());
            }
        }
        self.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Shard side: awake again; rings until the next [`park`](Self::park) are free.
    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Shard side, when its poller ends: drops the waker so that no other thread holds it.
    pub fn clear(&self) {
        self.unpark();
        if let Ok(mut g) = self.waker.lock() {
            g.take();
        }
    }

    /// Shard side, before [`park`](Self::park): its request queue was full; the core is to ring
    /// once it has taken from it. The caller checks the queue for room after parking.
    pub fn want_room(&self) {
        self.room_wanted.store(true, Ordering::Relaxed);
    }

    /// Core side, after taking requests from this shard's queue: rings if the shard waits for
    /// room (one fence and one atomic load if not).
    pub fn room_made(&self) {
        fence(Ordering::SeqCst);
        if self.room_wanted.load(Ordering::Relaxed)
            && self.room_wanted.swap(false, Ordering::AcqRel)
        {
            self.ring();
        }
    }

    /// Core side, after queueing replies: wakes the poller if it sleeps (one atomic load if not).
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            if let Ok(g) = self.waker.lock() {
                if let Some(w) = g.as_ref() {
                    w.wake_by_ref();
                }
            }
        }
    }
}

/// The shard's end of its link to the core.
#[derive(Debug, Clone)]
pub struct ShardLink {
    pub to_core: Sender<CoreRequest>,
    pub from_core: Receiver<CoreReply>,
    /// Rung by the core after it queued replies for this shard.
    pub bell: Arc<ShardBell>,
    /// Embedded core: rung (a `try_send`, never blocking) for requests that need a prompt
    /// answer or when `to_core` fills; otherwise the core takes requests in at its commit
    /// window. `None`: the core reads its queue promptly anyway (the cluster link).
    pub wake_core: Option<Sender<()>>,
    /// Shared by every shard: while stalled, shards read no client input (the cluster edge's
    /// outbox is at its bound or the bus is stalled). The embedded core never stalls it.
    pub gate: Arc<AcceptGate>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The bell wakes a parked poller once per park, and nobody otherwise.
    #[test]
    fn a_ring_wakes_only_a_parked_waiter_once() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let woken = || count.0.load(Ordering::SeqCst);
        let waker = Waker::from(Arc::clone(&count));
        let bell = ShardBell::default();
        bell.ring();
        assert_eq!(woken(), 0, "nobody parked");
        bell.park(&waker);
        bell.ring();
        assert_eq!(woken(), 1);
        bell.ring();
        assert_eq!(woken(), 1, "the first ring unparked it");
        bell.park(&waker);
        bell.unpark();
        bell.ring();
        assert_eq!(woken(), 1, "awake again: no wake-up");
        bell.park(&waker);
        bell.clear();
        bell.ring();
        assert_eq!(woken(), 1, "cleared: the waker is gone");
    }

    /// Room made in a queue wakes a poller that wanted room, once, and nobody else.
    #[test]
    fn room_made_wakes_only_a_poller_that_wants_room() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let woken = || count.0.load(Ordering::SeqCst);
        let waker = Waker::from(Arc::clone(&count));
        let bell = ShardBell::default();
        bell.park(&waker);
        bell.room_made();
        assert_eq!(woken(), 0, "parked for replies, not for room");
        bell.want_room();
        bell.room_made();
        assert_eq!(woken(), 1);
        bell.park(&waker);
        bell.room_made();
        assert_eq!(woken(), 1, "the wish was used up");
        bell.want_room();
        bell.park(&waker);
        let b = std::thread::scope(|sc| sc.spawn(|| bell.room_made()).join());
        assert!(b.is_ok());
        assert_eq!(woken(), 2, "from another thread");
    }

    /// A ring from another thread reaches a waiter parked on this one.
    #[test]
    fn a_ring_from_another_thread_wakes() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let bell = Arc::new(ShardBell::default());
        bell.park(&Waker::from(Arc::clone(&count)));
        let b = Arc::clone(&bell);
        std::thread::spawn(move || b.ring()).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
