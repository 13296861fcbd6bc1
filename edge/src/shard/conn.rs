//! One client connection: a single task per socket that reads, decodes, dispatches and writes.
//!
//! Reads land in the shard's shared scratch buffer and are copied into the connection's own input
//! buffer only to complete a frame, so an idle connection holds no read buffer. Output for the
//! client (replies, live messages, drained messages) is appended by any part of the shard to the
//! connection's [`ConnShared`] output queue and flushed by the task with non-blocking writes,
//! many frames per write. The output queue is bounded: a client that lets it grow past
//! `max_output_bytes` is disconnected, and whatever it had not acked stays stored.
//!
//! Login: the session is registered with the user's presence owner, which answers
//! `Registered`; only then is LOGIN_OK written (so a status query, typing indicator or receipt
//! sent by anyone who has seen it finds the user online: PROTOCOL.md "Visibility after
//! LOGIN_OK"; the connection decodes nothing more meanwhile) and the store asked for the backlog (in chunks,
//! while the output queue is below `drain_low_water_bytes`). Live messages that arrive during the
//! drain are held and written after it, skipping any the drain already wrote, so the client sees
//! its messages in order and a message stored just before login is never missed.
//!
//! Backpressure: while the shard is backed up ([`Shard::backpressured`]) or the link's accept
//! gate is stalled (cluster: the outbox reached `outbox_max_bytes`, or the broker has not
//! acknowledged for `bus_stall_ms`), the connection reads nothing. During a stall a logged-in
//! connection with input waiting is told once per stall with `0xFF RATE_LIMITED u32
//! retry_after_ms`: it is found with a one-byte read, and that byte stays in the input buffer
//! until reading resumes, so nothing read is ever dropped.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::timer::Timer;
use iris_core::api::{ConnId, CoreRequest, DrainedMsg, StoredMsg};
use iris_core::outbox::AcceptGate;
use std::sync::atomic::AtomicBool;
use tracing::{debug, warn};

use super::transport::Transport;
use super::v2::{self as v2out, Proto, V2State};
use super::{owner_of, Delivery, Meta, Shard, ShardMsg};
use crate::auth;
use crate::metrics::{first_time, ShardMetrics};
use crate::protocol::decode::frame_len_hint;
use crate::protocol::frame::{self, op, ClientFrame};
use crate::protocol::{decode, Decoded, MsgId, ProtoError};
use crate::ratelimit::TokenBucket;
use iris_wire::v2::{
    encode_server, ClientFrame as V2Client, Decoded as V2Decoded, ErrorCode, LimitedAction,
    MsgKind, ReceiptKind, ServerFrame,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Open,
    AfterFlush,
    Now,
}

#[derive(Debug)]
struct DrainState {
    user: Vec<u8>,
    /// A chunk is requested and not answered yet.
    requested: bool,
    /// The next chunk starts after this id, once the output queue is low.
    next_after: Option<u64>,
    /// The last [`DRAIN_SENT_MAX`] ids written by the drain (ascending): a live copy of one of
    /// them is not written again. A live copy of an older drained message may be (a duplicate,
    /// never a loss).
    sent: VecDeque<u64>,
    /// Live messages that arrived during the drain.
    held: Vec<(u64, Vec<u8>)>,
    held_bytes: usize,
    /// The highest id the drain wrote (0: none yet).
    cursor: u64,
    /// Held messages overflowed `max_output_bytes` and were dropped (they are stored): the drain
    /// goes on past what would have been its last chunk, so it picks them up in order.
    overflowed: bool,
    /// Answers still due to a drain this one replaced (a LOGIN on a connection whose last
    /// session's chunk was not answered yet): the embedded core answers a shard's drains in
    /// order, so the next `stale` chunks are theirs and are dropped (what they hold is stored,
    /// and this drain reads the store anew). Taken for this drain's own, an answer read before
    /// the live copies the old session held back were stored would end this drain without
    /// them (and, empty, tell the presence owner the inbox was empty).
    stale: u32,
}

impl DrainState {
    fn new(user: &[u8], stale: u32) -> Box<Self> {
        Box::new(Self {
            stale,
            user: user.to_vec(),
            requested: false,
            next_after: None,
            sent: VecDeque::new(),
            held: Vec::new(),
            held_bytes: 0,
            cursor: 0,
            overflowed: false,
        })
    }
}

/// Drained ids a connection remembers to drop live copies of them (512 KiB per draining
/// connection at most): live copies that trail their drained twins are of the newest messages.
const DRAIN_SENT_MAX: usize = 65_536;

/// How often a connection looks at a stalled accept gate again.
const STALL_RECHECK: Duration = Duration::from_millis(10);
/// The `retry_after_ms` of the RATE_LIMITED frame sent when the bus stalls.
const STALL_RETRY_AFTER_MS: u32 = 1_000;

/// How long after a drain ends live copies of drained messages are still recognised and
/// dropped. A live copy can trail its drained twin when the sender's ring to the owner shard is
/// slower than the store's round trip; ring latency is far below this.
const RECENT_DRAIN_TTL: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct RecentDrain {
    ids: Vec<u64>,
    until: Instant,
}

#[derive(Debug)]
struct ConnState {
    out: Vec<u8>,
    out_pos: usize,
    /// This connection's share of the shard's queued-output sum (`Shard::output_queued`):
    /// its pending output when last accounted ([`ConnShared::account`]).
    counted: usize,
    waker: Option<Waker>,
    close: Close,
    user: Option<Vec<u8>>,
    drain: Option<Box<DrainState>>,
    /// Ids the last drain wrote, for a while after it ended.
    recent: Option<Box<RecentDrain>>,
    /// The accept-gate stall this connection was last told about (RATE_LIMITED).
    told_stall: u64,
    /// A LOGIN is accepted and its session not yet registered with the user's presence owner:
    /// LOGIN_OK is held back, and nothing more is read or decoded, until `Registered`.
    registering: bool,
    /// Registration done: the task must decode what it buffered meanwhile.
    resume: bool,
    /// The session's login drain found the store empty (a complete first chunk with nothing
    /// in it) or was skipped as clean: told to the presence owner when the session ends.
    drained_empty: bool,
    /// Decoding stopped at a FETCH_PREKEYS because the shard's replies were full: decode the
    /// rest as soon as the shard is no longer backpressured, without waiting for new bytes.
    replies_wait: bool,
    /// The last time a byte was read from or written to the socket (or the shard held the
    /// connection back): `idle_timeout_ms` counts from here.
    progress: Instant,
    /// The last time the socket took output from us (the output budget keeper closes the
    /// connections whose output is stuck first).
    wrote: Instant,
    /// Protocol v2 state (v2 connections only).
    pub(super) v2: Option<Box<V2State>>,
}

/// The part of a connection other tasks of the shard can reach: its output queue and session.
#[derive(Debug)]
pub struct ConnShared {
    pub id: ConnId,
    /// The protocol the client speaks (the port it connected to).
    pub proto: Proto,
    st: RefCell<ConnState>,
}

impl ConnShared {
    fn new(id: ConnId, proto: Proto) -> Self {
        Self {
            id,
            proto,
            st: RefCell::new(ConnState {
                out: Vec::new(),
                out_pos: 0,
                counted: 0,
                waker: None,
                close: Close::Open,
                user: None,
                drain: None,
                recent: None,
                told_stall: 0,
                registering: false,
                resume: false,
                drained_empty: false,
                replies_wait: false,
                progress: Instant::now(),
                wrote: Instant::now(),
                v2: (proto == Proto::V2).then(V2State::new),
            }),
        }
    }

    fn pending_out(st: &ConnState) -> usize {
        st.out.len() - st.out_pos
    }

    /// Brings the shard's queued-output sum up to date with this connection's queue: after
    /// every append, every write and a slow-consumer drop; a connection that closes otherwise
    /// is accounted at the end of its task (`run`).
    fn account(shard: &Shard, st: &mut ConnState) {
        let pending = Self::pending_out(st);
        if pending != st.counted {
            shard.output_queued_changed(st.counted, pending);
            st.counted = pending;
        }
    }

    /// Output queued and not yet written, and whether the socket took none of it for
    /// [`OUTPUT_STUCK`].
    pub fn queued_out(&self) -> (usize, bool) {
        let st = self.st.borrow();
        (Self::pending_out(&st), st.wrote.elapsed() >= OUTPUT_STUCK)
    }

    /// The shard's queued output is over `max_output_bytes_per_shard` and this connection holds
    /// among the most: it is closed as a slow consumer (see `Shard::output_budget_keeper`).
    pub fn disconnect_over_budget(&self, shard: &Shard) {
        let mut st = self.st.borrow_mut();
        if st.close == Close::Now {
            return;
        }
        ShardMetrics::inc(&shard.metrics.output_budget_disconnects_total);
        self.disconnect_slow(shard, &mut st);
    }

    /// Appends v1 server frames to the output queue (a v2 connection gets their v2
    /// equivalents, see `v2.rs`); disconnects a client whose queue is over the bound.
    fn append(&self, shard: &Shard, st: &mut ConnState, bytes: &[u8]) {
        if self.proto == Proto::V2 {
            let mut f = Vec::with_capacity(bytes.len() + 16);
            if let Some(v2) = st.v2.as_mut() {
                v2out::transcode(shard, self.id, v2, bytes, &mut f);
            }
            self.append_bounded(shard, st, &f, shard.cfg.max_output_bytes);
        } else {
            self.append_bounded(shard, st, bytes, shard.cfg.max_output_bytes);
        }
    }

    /// Appends frames already in the connection's protocol.
    fn append_native(&self, shard: &Shard, st: &mut ConnState, bytes: &[u8]) {
        self.append_bounded(shard, st, bytes, shard.cfg.max_output_bytes);
    }

    /// v2: the core confirmed one of this connection's SENDs; reading resumes if it was held
    /// at `v2.max_unconfirmed_sends`.
    pub fn unconfirmed_done(&self, shard: &Shard) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        if let Some(v2) = st.v2.as_mut() {
            let held = v2.unconfirmed >= shard.cfg.v2.max_unconfirmed_sends;
            v2.unconfirmed = v2.unconfirmed.saturating_sub(1);
            if held {
                // Only a connection that stopped reading needs waking to decode what it holds.
                st.resume = true;
                if let Some(w) = &st.waker {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Writes a frame already in the connection's protocol (v2 replies).
    pub fn write_native(&self, shard: &Shard, bytes: &[u8]) {
        let mut st = self.st.borrow_mut();
        self.append_native(shard, &mut st, bytes);
    }

    /// The bytes a delivery is written as on this connection: its v1 frame, or for a v2
    /// connection a DELIVER naming its sender (a relay is transcoded when appended).
    fn delivery_bytes(&self, d: Delivery) -> Vec<u8> {
        match (self.proto, d.id) {
            (Proto::V2, Some(id)) => {
                let payload = super::reliable_payload(d.v1_frame()).unwrap_or_default();
                let mut f = Vec::with_capacity(d.frame.len() + 32);
                v2out::encode_deliver(&mut f, id, d.sender(), d.meta.kind, payload);
                f
            }
            _ => d.into_v1_frame(),
        }
    }

    /// Appends bytes; a queue over `bound` means the client does not keep up: disconnect it
    /// (what it had not acked stays stored).
    fn append_bounded(&self, shard: &Shard, st: &mut ConnState, bytes: &[u8], bound: usize) {
        if st.close == Close::Now {
            return;
        }
        compact_out(&mut st.out, &mut st.out_pos);
        st.out.extend_from_slice(bytes);
        if Self::pending_out(st) > bound {
            self.disconnect_slow(shard, st);
        }
        Self::account(shard, st);
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
    }

    /// Closes a client that does not keep up; what it had not acked stays stored.
    fn disconnect_slow(&self, shard: &Shard, st: &mut ConnState) {
        ShardMetrics::inc(&shard.metrics.slow_consumer_disconnects_total);
        debug!(
            shard = shard.id,
            conn = self.id,
            "slow consumer disconnected"
        );
        st.close = Close::Now;
        st.out = Vec::new();
        st.out_pos = 0;
        Self::account(shard, st);
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
    }

    /// Writes a complete frame to the client.
    pub fn write_frame(&self, shard: &Shard, bytes: &[u8]) {
        let mut st = self.st.borrow_mut();
        self.append(shard, &mut st, bytes);
    }

    /// A delivery for `user` arrived from the owner shard.
    pub fn deliver(&self, shard: &Shard, user: &[u8], d: Delivery) {
        let mut st = self.st.borrow_mut();
        if st.user.as_deref() != Some(user) {
            return;
        }
        if self.proto == Proto::V1
            && d.id.is_none()
            && d.frame.first() == Some(&v2out::DELIVERED_RECEIPT_RELAY)
        {
            return; // a v2 "delivered" receipt: v1 has no such frame
        }
        let id = d.id;
        let frame = self.delivery_bytes(d);
        let d = (id, frame);
        let behind = Self::pending_out(&st) >= shard.cfg.drain_low_water_bytes;
        if let (Some(id), Some(drain)) = (d.0, st.drain.as_mut()) {
            if drain.overflowed {
                return; // stored; a later drain chunk writes it, in order
            }
            if drain.held_bytes + d.1.len() > shard.cfg.max_output_bytes {
                if behind {
                    // Not even reading its backlog while live messages pile up: a slow
                    // consumer. Everything it has not acked stays stored.
                    self.disconnect_slow(shard, &mut st);
                    return;
                }
                // Reading, just not as fast as messages arrive: drop the held copies (they are
                // stored) and let the drain pick them up, in order.
                drain.overflowed = true;
                drain.held = Vec::new();
                drain.held_bytes = 0;
                return;
            }
            drain.held_bytes += d.1.len();
            drain.held.push((id, d.1));
            return;
        }
        if let (Some(id), Some(recent)) = (d.0, st.recent.as_ref()) {
            if recent.until < Instant::now() {
                st.recent = None;
            } else if recent.ids.binary_search(&id).is_ok() {
                ShardMetrics::inc(&shard.metrics.duplicates_suppressed_total);
                return;
            }
        }
        let m = if d.0.is_some() {
            &shard.metrics.messages_delivered_live_total
        } else {
            &shard.metrics.relays_delivered_total
        };
        ShardMetrics::inc(m);
        if let Some(id) = d.0 {
            if let Some(v2) = st.v2.as_mut() {
                note_written(shard, v2, id);
            }
            self.append_native(shard, &mut st, &d.1);
        } else {
            self.append(shard, &mut st, &d.1);
        }
    }

    /// Presence registered the session: the user is reachable from every shard now, so
    /// LOGIN_OK goes out (PROTOCOL.md "Visibility after LOGIN_OK"), then the store is asked for
    /// the user's backlog; unless the owner knows the inbox is empty (`clean`, presence's
    /// "Known empty inboxes"), when the drain ends at once, without a round trip to the core.
    pub fn start_drain(&self, shard: &Rc<Shard>, user: &[u8], clean: bool) {
        let mut st = self.st.borrow_mut();
        if st.user.as_deref() != Some(user) {
            return;
        }
        if st.registering {
            st.registering = false;
            st.resume = true;
            let mut ok = Vec::with_capacity(9);
            frame::encode_login_ok(&mut ok);
            self.append(shard, &mut st, &ok);
        }
        if clean
            && st
                .drain
                .as_ref()
                .is_some_and(|d| !d.requested && d.stale == 0)
        {
            ShardMetrics::inc(&shard.metrics.login_drains_skipped_total);
            drop(st);
            self.drain_chunk(shard, user, Vec::new(), false, true);
            return;
        }
        let resume_after = st.v2.as_ref().map_or(0, |v2| v2.resume_after);
        if let Some(d) = st.drain.as_mut() {
            if !d.requested {
                d.requested = true;
                shard.push_core(CoreRequest::Drain {
                    user: user.to_vec(),
                    conn: self.id,
                    after: 0,
                    limit: shard.cfg.drain_chunk,
                    resume_after,
                });
            }
        }
    }

    /// A chunk of the user's backlog arrived from the store (`complete`: it could read it).
    pub fn drain_chunk(
        &self,
        shard: &Rc<Shard>,
        user: &[u8],
        msgs: Vec<DrainedMsg>,
        more: bool,
        complete: bool,
    ) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let Some(drain) = st.drain.as_mut() else {
            return;
        };
        if drain.stale > 0 {
            drain.stale -= 1;
            return;
        }
        if drain.user != user {
            return;
        }
        drain.requested = false;
        let mut frame_buf = Vec::new();
        ShardMetrics::add(&shard.metrics.messages_drained_total, msgs.len() as u64);
        for DrainedMsg {
            id,
            sender,
            payload,
            kind,
        } in msgs
        {
            if drain.cursor >= id {
                continue; // a repeated chunk (re-login race): never write an id twice
            }
            match self.proto {
                Proto::V1 => frame::encode_reliable(&mut frame_buf, MsgId(id), &payload),
                Proto::V2 => {
                    v2out::encode_deliver(
                        &mut frame_buf,
                        id,
                        &sender,
                        v2out::resolve_kind(kind, &payload),
                        &payload,
                    );
                    if let Some(v2) = st.v2.as_mut() {
                        note_written(shard, v2, id);
                    }
                }
            }
            drain.cursor = id;
            if drain.sent.len() == DRAIN_SENT_MAX {
                drain.sent.pop_front();
            }
            drain.sent.push_back(id);
        }
        let cursor = drain.cursor;
        if more || drain.overflowed {
            // Live messages were dropped while held: keep draining until a final chunk arrives
            // with nothing dropped, so they come from the store, in order.
            drain.overflowed = false;
            drain.next_after = Some(cursor);
        } else {
            let mut drain = st.drain.take().expect("checked above");
            // Nothing written by any chunk, and the last one read completely: the inbox was
            // empty when the drain began (a chunk that found nothing ends the drain).
            st.drained_empty = drain.cursor == 0 && complete;
            for (id, f) in drain.held.drain(..) {
                if drain.sent.binary_search(&id).is_err() {
                    frame_buf.extend_from_slice(&f);
                    ShardMetrics::inc(&shard.metrics.messages_delivered_live_total);
                    if let Some(v2) = st.v2.as_mut() {
                        note_written(shard, v2, id);
                    }
                }
            }
            if !drain.sent.is_empty() {
                st.recent = Some(Box::new(RecentDrain {
                    ids: Vec::from(std::mem::take(&mut drain.sent)),
                    until: Instant::now() + RECENT_DRAIN_TTL,
                }));
            }
        }
        // Drained output is pulled (a chunk is asked for only while the queue is below the low
        // water mark), so one chunk may take the queue past max_output_bytes without the client
        // being slow; the chunk size is bounded by the store (drain_chunk, drain_chunk_bytes).
        let bound = shard
            .cfg
            .max_output_bytes
            .max(Self::pending_out(st) + frame_buf.len());
        self.append_bounded(shard, st, &frame_buf, bound);
        drop(frame_buf);
        self.continue_drain(shard, st);
    }

    /// Requests the next drain chunk if one is due and the output queue is low enough.
    fn continue_drain(&self, shard: &Rc<Shard>, st: &mut ConnState) {
        let low = Self::pending_out(st) < shard.cfg.drain_low_water_bytes;
        if let Some(d) = st.drain.as_mut() {
            if low && !d.requested {
                if let Some(after) = d.next_after.take() {
                    d.requested = true;
                    shard.push_core(CoreRequest::Drain {
                        user: d.user.clone(),
                        conn: self.id,
                        after,
                        limit: shard.cfg.drain_chunk,
                        resume_after: 0,
                    });
                }
            }
        }
    }

    /// Shutdown: flush what is queued, then close.
    pub fn begin_shutdown(&self) {
        let mut st = self.st.borrow_mut();
        if st.close == Close::Open {
            st.close = Close::AfterFlush;
        }
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
    }

    /// Shutdown deadline passed: close now.
    pub fn force_close(&self) {
        let mut st = self.st.borrow_mut();
        st.close = Close::Now;
        if let Some(w) = &st.waker {
            w.wake_by_ref();
        }
    }

    fn user(&self) -> Option<Vec<u8>> {
        self.st.borrow().user.clone()
    }

    fn logged_in(&self) -> bool {
        self.st.borrow().user.is_some()
    }
}

enum Io {
    /// v2: the keepalive timer fired.
    Ping,
    Data,
    Eof,
    Closed,
    Failed(io::Error),
    Settled,
    LoginTimeout,
    /// The idle timer fired: see whether the connection made progress.
    IdleCheck,
    Recheck,
    /// The accept gate is stalled: nothing to process.
    Stalled,
}

struct Timers {
    /// v2 keepalive: PING a silent client, close one silent for three intervals.
    ping: Option<Pin<Box<Timer>>>,
    login: Option<Pin<Box<Timer>>>,
    idle: Option<Pin<Box<Timer>>>,
    settle: Option<Pin<Box<Timer>>>,
    backoff: Option<Pin<Box<Timer>>>,
}

fn poll_timer(t: &mut Option<Pin<Box<Timer>>>, cx: &mut Context<'_>) -> bool {
    if let Some(timer) = t {
        if timer.as_mut().poll(cx).is_ready() {
            *t = None;
            return true;
        }
    }
    false
}

impl ConnShared {
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        shard: &Rc<Shard>,
        stream: &mut Transport,
        inbuf: &mut Vec<u8>,
        timers: &mut Timers,
    ) -> Poll<Io> {
        {
            let mut st = self.st.borrow_mut();
            let st = &mut *st;
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
            if st.close == Close::Now {
                return Poll::Ready(Io::Closed);
            }
            while st.out_pos < st.out.len() {
                match Pin::new(&mut *stream).poll_write(cx, &st.out[st.out_pos..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Io::Closed),
                    Poll::Ready(Ok(n)) => {
                        st.out_pos += n;
                        st.progress = Instant::now();
                        st.wrote = st.progress;
                        ShardMetrics::add(&shard.metrics.bytes_out_total, n as u64);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed(e)),
                    Poll::Pending => break,
                }
            }
            Self::account(shard, st);
            // TLS records and WebSocket messages a transport holds go out too (plain TCP holds
            // nothing): the output counts as flushed only once they have.
            let held = match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed(e)),
                Poll::Pending => true,
            };
            if st.out_pos == st.out.len() && !held {
                st.out_pos = 0;
                if st.out.capacity() > 64 << 10 {
                    st.out = Vec::new();
                } else {
                    st.out.clear();
                }
                if st.close == Close::AfterFlush {
                    return Poll::Ready(Io::Closed);
                }
            }
            if st.drain.is_some() {
                self.continue_drain(shard, st);
            }
            // A logged-in (or closing) connection holding a partial frame or unsent output must
            // make progress within idle_timeout_ms.
            let holds = !inbuf.is_empty() || Self::pending_out(st) > 0;
            if holds && (st.user.is_some() || st.close != Close::Open) {
                if timers.idle.is_none() {
                    let idle = Duration::from_millis(shard.cfg.idle_timeout_ms);
                    let left = idle.saturating_sub(st.progress.elapsed());
                    timers.idle = Some(Box::pin(Timer::new(left.max(Duration::from_millis(1)))));
                }
                if poll_timer(&mut timers.idle, cx) {
                    return Poll::Ready(Io::IdleCheck);
                }
            } else {
                timers.idle = None;
            }
            if st.close != Close::Open {
                // Closing: read nothing more, wait for the flush (or the shutdown deadline).
                return Poll::Pending;
            }
            if st.registering {
                // LOGIN_OK waits for the presence owner; so does everything sent after LOGIN.
                return Poll::Pending;
            }
            if let Some(v2) = st.v2.as_ref() {
                if v2.hello {
                    if timers.ping.is_none() {
                        let every = Duration::from_millis(u64::from(shard.cfg.v2.ping_interval_ms));
                        timers.ping = Some(Box::pin(Timer::new(every)));
                    }
                    // Polled at every wake-up: a pending timer polled again by its task leaves
                    // the reactor alone (glommio patch 6).
                    if poll_timer(&mut timers.ping, cx) {
                        return Poll::Ready(Io::Ping);
                    }
                }
                if v2.unconfirmed >= shard.cfg.v2.max_unconfirmed_sends {
                    // Reads resume when the core confirms (`Shard::confirmed` wakes us).
                    return Poll::Pending;
                }
            }
            if st.resume {
                st.resume = false;
                return Poll::Ready(Io::Recheck);
            }
        }
        if poll_timer(&mut timers.settle, cx) {
            return Poll::Ready(Io::Settled);
        }
        if poll_timer(&mut timers.login, cx) {
            return Poll::Ready(Io::LoginTimeout);
        }
        let gate = shard.accept_gate().load();
        if AcceptGate::is_stalled(gate) {
            return self.poll_stalled(cx, shard, stream, inbuf, timers, gate);
        }
        if shard.backpressured() {
            if timers.backoff.is_none() {
                timers.backoff = Some(Box::pin(Timer::new(Duration::from_millis(1))));
            }
            if poll_timer(&mut timers.backoff, cx) {
                return Poll::Ready(Io::Recheck);
            }
            return Poll::Pending;
        }
        if std::mem::take(&mut self.st.borrow_mut().replies_wait) {
            return Poll::Ready(Io::Recheck);
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) => Poll::Ready(Io::Eof),
            Poll::Ready(Ok(n)) => {
                ShardMetrics::add(&shard.metrics.bytes_in_total, n as u64);
                inbuf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Io::Data)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Io::Failed(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ConnShared {
    /// The bus is stalled: read nothing, except one byte of a logged-in connection not yet told
    /// about this stall, to learn that it has input; that byte is kept (in `inbuf`) and the
    /// connection is told RATE_LIMITED.
    fn poll_stalled(
        &self,
        cx: &mut Context<'_>,
        shard: &Rc<Shard>,
        stream: &mut Transport,
        inbuf: &mut Vec<u8>,
        timers: &mut Timers,
        gate: u64,
    ) -> Poll<Io> {
        let stall = AcceptGate::epoch(gate);
        let ask = {
            let st = self.st.borrow();
            st.user.is_some() && st.told_stall != stall
        };
        if ask {
            let mut scratch = shard.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..1]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Io::Eof),
                Poll::Ready(Ok(n)) => {
                    ShardMetrics::add(&shard.metrics.bytes_in_total, n as u64);
                    inbuf.extend_from_slice(&scratch[..n]);
                    ShardMetrics::inc(&shard.metrics.rate_limited_total);
                    let mut f = Vec::with_capacity(5);
                    crate::protocol::frame::encode_rate_limited(&mut f, STALL_RETRY_AFTER_MS);
                    let mut st = self.st.borrow_mut();
                    st.told_stall = stall;
                    self.append(shard, &mut st, &f);
                    debug!(shard = shard.id, conn = self.id, stall, "told rate limited");
                    return Poll::Ready(Io::Stalled);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Io::Failed(e)),
                Poll::Pending => {}
            }
        }
        if timers.backoff.is_none() {
            timers.backoff = Some(Box::pin(Timer::new(STALL_RECHECK)));
        }
        if poll_timer(&mut timers.backoff, cx) {
            return Poll::Ready(Io::Stalled);
        }
        Poll::Pending
    }
}

/// What decoding the input buffer asks of the connection loop.
enum Step {
    /// Need more bytes.
    More,
    /// A LOGIN is at the head: wait for the settle timer before parsing it.
    Settle,
    /// Close after flushing what is queued.
    Close,
}

/// The per-connection counters and token buckets of [`Conn`].
#[derive(Default)]
struct ConnLimits {
    /// Unknown opcodes: the start of the current window and how many arrived in it.
    errors: Option<(Instant, u32)>,
    /// Relay token bucket (TYPING, read receipts).
    typing: Option<TokenBucket>,
    /// `[rate_limits]` buckets of this connection.
    v1_sends: Option<TokenBucket>,
    prekey_fetches: Option<TokenBucket>,
}

impl ConnLimits {
    /// The limits in `slot`, allocated on first use. (A function of the field, not of the
    /// connection, so that callers may hold other borrows of the connection meanwhile.)
    fn of(slot: &mut Option<Box<ConnLimits>>) -> &mut ConnLimits {
        slot.get_or_insert_with(Box::default)
    }
}

struct Conn {
    shard: Rc<Shard>,
    c: Rc<ConnShared>,
    /// The settle timer of the LOGIN at the head of the buffer has fired.
    login_settled: bool,
    settle_started: bool,
    /// The connection's limits, allocated the first time one is needed: an idle connection,
    /// and every connection's task, carries only the pointer (BENCHMARKS.md "Many connections").
    limits: Option<Box<ConnLimits>>,
    /// Whether the client was told about the current run of refused relays.
    relays_told: bool,
    /// The client's address (login limit per source address).
    peer: Option<std::net::IpAddr>,
    /// The edge's id high-water tick read at the last LOGIN, until the next message is minted
    /// above it (`idgen.rs`: a sender that reconnects onto this shard after a burst elsewhere
    /// keeps its order); 0 once used.
    id_floor: Cell<u64>,
    /// v2: the SEND being accepted (its client_msg_id and payload kind), read by
    /// [`Conn::accept_message`].
    sending: Option<(u64, u8)>,
}

/// Records that message `id` was written to a v2 connection (for the next session's
/// `resume_after`); an id forgotten at the list's bound is counted and logged once.
fn note_written(shard: &Shard, v2: &mut V2State, id: u64) {
    if v2.wrote(id) {
        ShardMetrics::inc(&shard.metrics.v2_resume_ids_forgotten_total);
        if first_time(&LOGGED_RESUME_IDS) {
            warn!(
                shard = shard.id,
                max_ids = iris_core::api::RESUME_IDS_MAX,
                "a v2 connection holds more unacked messages than its resume list keeps: the \
                 oldest cannot be acknowledged by resume_after (logged once; \
                 iris_edge_v2_resume_ids_forgotten_total counts them)"
            );
        }
    }
}

/// Each limit a client can hit is logged once per process, then only counted.
static LOGGED_RESUME_IDS: AtomicBool = AtomicBool::new(false);
static LOGGED_ERROR_LIMIT: AtomicBool = AtomicBool::new(false);
static LOGGED_TYPING_LIMIT: AtomicBool = AtomicBool::new(false);
static LOGGED_IDLE_TIMEOUT: AtomicBool = AtomicBool::new(false);

impl Conn {
    fn fail(&self, e: &ProtoError) -> Step {
        ShardMetrics::inc(&self.shard.metrics.protocol_errors_total);
        debug!(
            shard = self.shard.id,
            conn = self.c.id,
            reason = e.reason(),
            "bad frame"
        );
        let mut f = Vec::with_capacity(32);
        e.encode_wire(&mut f);
        self.close_with(&f)
    }

    /// An unknown opcode: `0xFE unknown_opcode`, the connection stays open unless it sent more
    /// than `unknown_opcode_limit` of them within `unknown_opcode_window_ms`.
    fn unknown_opcode(&mut self, op: u8) -> Step {
        let shard = self.shard.clone();
        ShardMetrics::inc(&shard.metrics.unknown_opcodes_total);
        let now = Instant::now();
        let window = Duration::from_millis(shard.cfg.unknown_opcode_window_ms);
        let limits = ConnLimits::of(&mut self.limits);
        match limits.errors {
            Some((start, ref mut n)) if now.duration_since(start) < window => *n += 1,
            _ => limits.errors = Some((now, 1)),
        }
        let n = limits.errors.map_or(0, |(_, n)| n);
        debug!(shard = shard.id, conn = self.c.id, op, n, "unknown opcode");
        if n > shard.cfg.unknown_opcode_limit {
            ShardMetrics::inc(&shard.metrics.error_limit_disconnects_total);
            if first_time(&LOGGED_ERROR_LIMIT) {
                warn!(
                    shard = shard.id,
                    conn = self.c.id,
                    limit = shard.cfg.unknown_opcode_limit,
                    window_ms = shard.cfg.unknown_opcode_window_ms,
                    "a client sent too many unknown opcodes and was closed (logged once; \
                     iris_edge_error_limit_disconnects_total counts them)"
                );
            }
            return self.close_with(&error_frame("too_many_errors"));
        }
        self.error_reply(ProtoError::UnknownOpcode(op).reason());
        Step::More
    }

    /// The idle timer fired. Closes a connection that still holds a partial frame (`partial`)
    /// or unsent output and has read and written nothing for `idle_timeout_ms`, unless the
    /// shard itself held it back (backpressure, bus stall), which counts as progress.
    fn idle_check(&self, partial: bool) -> Step {
        let shard = &self.shard;
        let idle = Duration::from_millis(shard.cfg.idle_timeout_ms);
        let mut st = self.c.st.borrow_mut();
        let unsent = ConnShared::pending_out(&st) > 0;
        if !(partial || unsent) || st.progress.elapsed() < idle {
            return Step::More;
        }
        if shard.backpressured() || AcceptGate::is_stalled(shard.accept_gate().load()) {
            st.progress = Instant::now();
            return Step::More;
        }
        ShardMetrics::inc(&shard.metrics.idle_timeouts_total);
        debug!(
            shard = shard.id,
            conn = self.c.id,
            partial,
            unsent,
            "idle timeout"
        );
        if first_time(&LOGGED_IDLE_TIMEOUT) {
            warn!(
                shard = shard.id,
                conn = self.c.id,
                idle_timeout_ms = shard.cfg.idle_timeout_ms,
                "a connection holding a partial frame or unsent output made no progress and \
                 was closed (logged once; iris_edge_idle_timeouts_total counts them)"
            );
        }
        if unsent {
            // Its output does not move: nothing more can be told.
            st.close = Close::Now;
            st.out = Vec::new();
            st.out_pos = 0;
            return Step::Close;
        }
        drop(st);
        self.close_with(&error_frame("idle_timeout"))
    }

    /// Token bucket of TYPING relays: `typing_relays_per_sec` per second, `typing_relay_burst`
    /// at once.
    /// A dropped frame is counted (a flood of 4-byte frames would otherwise be relayed as
    /// frames up to 65 times larger, and make its recipient a slow consumer).
    fn typing_allowed(&mut self) -> bool {
        let (rate, burst) = (
            self.shard.cfg.typing_relays_per_sec,
            self.shard.cfg.typing_relay_burst,
        );
        let now = Instant::now();
        let bucket = ConnLimits::of(&mut self.limits)
            .typing
            .get_or_insert_with(|| TokenBucket::full(burst, now));
        let retry_after_ms = match bucket.take(rate, burst, now) {
            Ok(()) => {
                self.relays_told = false;
                return true;
            }
            Err(ms) => ms,
        };
        ShardMetrics::inc(&self.shard.metrics.typing_dropped_total);
        if first_time(&LOGGED_TYPING_LIMIT) {
            warn!(
                shard = self.shard.id,
                conn = self.c.id,
                typing_relays_per_sec = self.shard.cfg.typing_relays_per_sec,
                "typing relays and receipts over the limit are dropped (logged once; \
                 iris_edge_typing_dropped_total counts them)"
            );
        }
        // Told once per run of refusals (not per frame: a flood of 4-byte frames must not be
        // answered frame for frame).
        if !std::mem::replace(&mut self.relays_told, true) {
            ShardMetrics::inc(&self.shard.metrics.rate_limited_relays_total);
            self.rate_limited(LimitedAction::Relay, retry_after_ms, 0);
        }
        false
    }

    /// Tells the client an action was refused by a rate limit: v1 `0xFF u32 retry_after_ms`,
    /// v2 RATE_LIMITED naming what and the SEND (`reference`).
    fn rate_limited(&self, what: LimitedAction, retry_after_ms: u32, reference: u64) {
        match self.c.proto {
            Proto::V1 => {
                let mut f = Vec::with_capacity(5);
                frame::encode_rate_limited(&mut f, retry_after_ms);
                self.c.write_frame(&self.shard, &f);
            }
            Proto::V2 => self.reply_v2(&ServerFrame::RateLimited {
                what,
                retry_after_ms,
                reference,
            }),
        }
    }

    /// `[rate_limits]` for one message of the logged-in `sender`: the per-user bucket (shared
    /// by its sessions on this shard) and, on v1, the per-connection one. A refusal is answered
    /// (v1 0xFF, v2 RATE_LIMITED naming the SEND) and counted; the message is not accepted.
    fn send_admitted(&mut self, sender: &[u8]) -> bool {
        let r = &self.shard.cfg.rate_limits;
        if r.sends_per_sec_per_user == 0 && (r.v1_sends_per_sec == 0 || self.c.proto == Proto::V2) {
            return true; // the limits are off: nothing to look up on the message path
        }
        let now = Instant::now();
        let mut verdict = if r.sends_per_sec_per_user == 0 {
            Ok(())
        } else {
            self.shard.user_sends.borrow_mut().take(
                sender,
                r.sends_per_sec_per_user,
                r.send_burst_per_user,
                now,
            )
        };
        if verdict.is_ok() && self.c.proto == Proto::V1 && r.v1_sends_per_sec > 0 {
            verdict = ConnLimits::of(&mut self.limits)
                .v1_sends
                .get_or_insert_with(|| TokenBucket::full(r.v1_send_burst, now))
                .take(r.v1_sends_per_sec, r.v1_send_burst, now);
        }
        match verdict {
            Ok(()) => true,
            Err(ms) => {
                ShardMetrics::inc(&self.shard.metrics.rate_limited_sends_total);
                let reference = self.sending.map_or(0, |(client, _)| client);
                self.rate_limited(LimitedAction::Send, ms, reference);
                false
            }
        }
    }

    /// `[rate_limits] prekey_fetches_per_sec` of this connection; a refusal is answered.
    fn prekey_fetch_admitted(&mut self) -> bool {
        let r = &self.shard.cfg.rate_limits;
        let now = Instant::now();
        let verdict = ConnLimits::of(&mut self.limits)
            .prekey_fetches
            .get_or_insert_with(|| TokenBucket::full(r.prekey_fetch_burst, now))
            .take(r.prekey_fetches_per_sec, r.prekey_fetch_burst, now);
        match verdict {
            Ok(()) => true,
            Err(ms) => {
                ShardMetrics::inc(&self.shard.metrics.rate_limited_prekey_fetches_total);
                self.rate_limited(LimitedAction::PrekeyFetch, ms, 0);
                false
            }
        }
    }

    /// `[rate_limits] logins_per_sec_per_address` for this connection's peer; `Err` with the
    /// wait when refused (the caller answers and closes).
    fn login_admitted(&self) -> Result<(), u32> {
        let r = &self.shard.cfg.rate_limits;
        let Some(ip) = self.peer else {
            return Ok(());
        };
        let verdict = self.shard.login_buckets.borrow_mut().take(
            &ip,
            r.logins_per_sec_per_address,
            r.login_burst_per_address,
            Instant::now(),
        );
        if verdict.is_err() {
            ShardMetrics::inc(&self.shard.metrics.rate_limited_logins_total);
            ShardMetrics::inc(&self.shard.metrics.logins_refused_total);
        }
        verdict
    }

    fn close_with(&self, bytes: &[u8]) -> Step {
        let mut st = self.c.st.borrow_mut();
        self.c.append(&self.shard, &mut st, bytes);
        if st.close == Close::Open {
            st.close = Close::AfterFlush;
        }
        Step::Close
    }

    fn error_reply(&self, reason: &str) {
        self.c.write_frame(&self.shard, &error_frame(reason));
    }

    /// Decodes and handles every complete frame in `inbuf`, then drops the consumed bytes.
    fn process(&mut self, inbuf: &mut Vec<u8>) -> Step {
        if self.c.proto == Proto::V2 {
            return self.process_v2(inbuf);
        }
        let mut pos = 0;
        let step = loop {
            let buf = &inbuf[pos..];
            if buf.is_empty() {
                break Step::More;
            }
            if buf[0] == op::LOGIN
                && !self.login_settled
                && self.shard.cfg.login_settle_us > 0
                && !(self.shard.auth.is_some() && auth::is_whole_login(&buf[1..]))
            {
                break Step::Settle;
            }
            if buf[0] == op::FETCH_PREKEYS && self.shard.replies_full() {
                // Decoded once replies come back (the connection reads nothing meanwhile).
                self.c.st.borrow_mut().replies_wait = true;
                break Step::More;
            }
            match decode(buf, &self.shard.limits) {
                Ok(Decoded::Incomplete) => {
                    if frame_len_hint(buf).is_some_and(|n| n > self.shard.cfg.max_input_bytes)
                        || buf.len() > self.shard.cfg.max_input_bytes
                    {
                        break self.fail(&ProtoError::FrameTooLarge);
                    }
                    break Step::More;
                }
                Ok(Decoded::Frame(f, n)) => {
                    pos += n;
                    ShardMetrics::inc(&self.shard.metrics.frames_in_total);
                    if let ClientFrame::Login { .. } = f {
                        self.login_settled = false;
                        self.settle_started = false;
                    }
                    if let Err(step) = self.handle(f) {
                        break step;
                    }
                    if self.c.st.borrow().registering {
                        // The rest is decoded once the session is registered (after LOGIN_OK).
                        break Step::More;
                    }
                }
                Err(ProtoError::UnknownOpcode(op)) => {
                    // PROTOCOL.md: answer, discard the rest of that read, keep the connection.
                    pos = inbuf.len();
                    break self.unknown_opcode(op);
                }
                Err(e) => break self.fail(&e),
            }
        };
        inbuf.drain(..pos);
        if inbuf.is_empty() && inbuf.capacity() > 4096 {
            *inbuf = Vec::new();
        }
        step
    }

    /// Closes after writing `f`, a v2 frame.
    fn close_with_v2(&self, f: &ServerFrame) -> Step {
        let mut b = Vec::with_capacity(64);
        encode_server(f, &mut b);
        let mut st = self.c.st.borrow_mut();
        self.c.append_native(&self.shard, &mut st, &b);
        if st.close == Close::Open {
            st.close = Close::AfterFlush;
        }
        Step::Close
    }

    /// Writes one v2 frame.
    fn reply_v2(&self, f: &ServerFrame) {
        let mut b = Vec::with_capacity(64);
        encode_server(f, &mut b);
        self.c.write_native(&self.shard, &b);
    }

    /// v2: answers an error; closes when the code says so.
    fn error_v2(&self, code: ErrorCode, reference: u64) -> Result<(), Step> {
        ShardMetrics::inc(&self.shard.metrics.protocol_errors_total);
        let f = ServerFrame::error(code, reference);
        if code.closes() {
            return Err(self.close_with_v2(&f));
        }
        self.reply_v2(&f);
        Ok(())
    }

    /// The v2 twin of [`Self::process`]: decodes every complete v2 frame in `inbuf`.
    fn process_v2(&mut self, inbuf: &mut Vec<u8>) -> Step {
        let mut pos = 0;
        let step = loop {
            let buf = &inbuf[pos..];
            if buf.is_empty() {
                break Step::More;
            }
            let blocked = self
                .c
                .st
                .borrow()
                .v2
                .as_ref()
                .is_some_and(|v| v.unconfirmed >= self.shard.cfg.v2.max_unconfirmed_sends);
            if blocked {
                // The rest is decoded as confirmations come back.
                break Step::More;
            }
            // Before HELLO only a small frame is read (docs/PROTOCOL-v2.md).
            let hello = self.c.st.borrow().v2.as_ref().is_some_and(|v| v.hello);
            let max = if hello {
                self.shard.cfg.v2.max_frame_bytes as usize
            } else {
                iris_wire::v2::MAX_HELLO_FRAME_BYTES
            };
            match iris_wire::v2::decode_client(buf, max) {
                Ok(V2Decoded::Incomplete { .. }) => break Step::More,
                Ok(V2Decoded::Frame { frame, consumed }) => {
                    pos += consumed;
                    ShardMetrics::inc(&self.shard.metrics.frames_in_total);
                    if let Err(step) = self.handle_v2(frame) {
                        break step;
                    }
                    if self.c.st.borrow().registering {
                        break Step::More;
                    }
                }
                Ok(V2Decoded::Unknown { ty, consumed }) => {
                    pos += consumed;
                    ShardMetrics::inc(&self.shard.metrics.unknown_opcodes_total);
                    debug!(
                        shard = self.shard.id,
                        conn = self.c.id,
                        ty,
                        "v2 unknown type"
                    );
                    if let Err(step) = self.error_v2(ErrorCode::UnknownType, 0) {
                        break step;
                    }
                }
                Err(e) => {
                    debug!(shard = self.shard.id, conn = self.c.id, error = %e, "v2 bad frame");
                    let skip = e.skip();
                    if let Err(step) = self.error_v2(e.error_code(), e.reference()) {
                        break step;
                    }
                    match skip {
                        Some(n) => pos += n,
                        None => {
                            let f = ServerFrame::error(e.error_code(), e.reference());
                            break self.close_with_v2(&f);
                        }
                    }
                }
            }
        };
        inbuf.drain(..pos);
        if inbuf.is_empty() && inbuf.capacity() > 4096 {
            *inbuf = Vec::new();
        }
        step
    }

    /// SEND token bucket of a v2 connection (`v2.send_rate_per_sec`, `v2.send_burst`).
    fn send_allowed(&mut self) -> Result<(), u32> {
        let (rate, burst) = (
            self.shard.cfg.v2.send_rate_per_sec,
            self.shard.cfg.v2.send_burst,
        );
        let now = Instant::now();
        let mut st = self.c.st.borrow_mut();
        let Some(v2) = st.v2.as_mut() else {
            return Ok(());
        };
        v2.sends
            .get_or_insert_with(|| TokenBucket::full(burst, now))
            .take(rate, burst, now)
    }

    fn handle_v2(&mut self, f: V2Client) -> Result<(), Step> {
        let shard = self.shard.clone();
        let hello = self.c.st.borrow().v2.as_ref().is_some_and(|v| v.hello);
        if !hello && !matches!(f, V2Client::Hello { .. }) {
            return self.error_v2(ErrorCode::HelloRequired, 0);
        }
        match f {
            V2Client::Hello {
                token,
                resume_after,
                ..
            } => {
                if hello {
                    return self.error_v2(ErrorCode::DuplicateHello, 0);
                }
                let (user, jwt) = auth::split_login(&token);
                if user.is_empty() || user.len() > shard.limits.max_target_bytes {
                    ShardMetrics::inc(&shard.metrics.logins_refused_total);
                    return self.error_v2(ErrorCode::BadToken, 0);
                }
                if let Err(retry_after_ms) = self.login_admitted() {
                    return Err(self.close_with_v2(&ServerFrame::RateLimited {
                        what: LimitedAction::Login,
                        retry_after_ms,
                        reference: 0,
                    }));
                }
                if let Some(verifier) = &shard.auth {
                    let now_ms = crate::idgen::now_micros() / 1000;
                    if let Err(e) = verifier.verify(user, jwt, now_ms) {
                        ShardMetrics::inc(&shard.metrics.logins_refused_total);
                        debug!(shard = shard.id, conn = self.c.id, error = %e, "v2 hello refused");
                        return self.error_v2(ErrorCode::BadToken, 0);
                    }
                }
                if let Some(v2) = self.c.st.borrow_mut().v2.as_mut() {
                    v2.hello = true;
                    v2.resume_after = resume_after;
                }
                // Registered like a v1 LOGIN; HELLO_OK is written where LOGIN_OK would be.
                return self.register(user);
            }
            V2Client::Send {
                client_msg_id,
                recipient,
                kind,
                payload,
            } => {
                let me = self.logged_in_user()?;
                if let Err(retry_after_ms) = self.send_allowed() {
                    ShardMetrics::inc(&shard.metrics.rate_limited_total);
                    ShardMetrics::inc(&shard.metrics.rate_limited_sends_total);
                    self.reply_v2(&ServerFrame::RateLimited {
                        what: LimitedAction::Send,
                        retry_after_ms,
                        reference: client_msg_id,
                    });
                    return Ok(());
                }
                let k = kind.to_u8();
                self.sending = Some((client_msg_id, k));
                if !self.send_admitted(&me) {
                    self.sending = None;
                    return Ok(());
                }
                let result = match kind {
                    MsgKind::Plain => {
                        self.accept_message(&me, &recipient, &payload, k);
                        Ok(())
                    }
                    MsgKind::Cbor => match crate::protocol::cbor::check_map(&payload) {
                        Ok(()) if payload.len() <= shard.limits.max_cbor_bytes => {
                            self.accept_message(&me, &recipient, &payload, k);
                            Ok(())
                        }
                        _ => self.error_v2(ErrorCode::BadPayload, client_msg_id),
                    },
                    MsgKind::E2ee => {
                        // v1's E2EE_MSG body after its recipient: decoded (and checked) by the
                        // v1 decoder, then stored as the same 0x24 inner frame.
                        let mut v1 = Vec::with_capacity(payload.len() + recipient.len() + 3);
                        v1.push(frame::op::E2EE_MSG);
                        v1.extend_from_slice(&(recipient.len() as u16).to_be_bytes());
                        v1.extend_from_slice(&recipient);
                        v1.extend_from_slice(&payload);
                        match decode(&v1, &shard.limits) {
                            Ok(Decoded::Frame(
                                ClientFrame::E2eeMsg {
                                    header, ciphertext, ..
                                },
                                n,
                            )) if n == v1.len() => {
                                let mut inner = Vec::with_capacity(v1.len() + me.len());
                                frame::encode_e2ee_delivery(&mut inner, &me, header, ciphertext);
                                self.accept_message(&me, &recipient, &inner, k);
                                Ok(())
                            }
                            _ => self.error_v2(ErrorCode::BadPayload, client_msg_id),
                        }
                    }
                };
                self.sending = None;
                result?;
            }
            V2Client::Ack { ids } => {
                let me = self.logged_in_user()?;
                let high = shard.idgen.borrow().high_water();
                if let Some(v2) = self.c.st.borrow_mut().v2.as_mut() {
                    v2.acked(&ids);
                }
                for id in ids {
                    ShardMetrics::inc(&shard.metrics.acks_total);
                    if minted_in_the_future(id, high) {
                        ShardMetrics::inc(&shard.metrics.acks_dropped_total);
                        continue;
                    }
                    shard.push_core(CoreRequest::Ack {
                        user: me.clone(),
                        id,
                    });
                }
            }
            V2Client::Receipt { kind, sender, ids } => {
                let me = self.logged_in_user()?;
                if !self.typing_allowed() {
                    return Ok(());
                }
                let now_ms = crate::idgen::now_micros() / 1000;
                for id in ids {
                    let text = MsgId(id).to_string();
                    let mut f = Vec::with_capacity(text.len() + me.len() + 13);
                    frame::encode_receipt_relay(&mut f, text.as_bytes(), &me, now_ms);
                    if kind == ReceiptKind::Delivered {
                        f[0] = v2out::DELIVERED_RECEIPT_RELAY;
                    }
                    shard.route(&sender, Delivery::relay(f));
                }
            }
            V2Client::Typing { target, typing } => {
                let me = self.logged_in_user()?;
                if !self.typing_allowed() {
                    return Ok(());
                }
                let mut f = Vec::with_capacity(me.len() + 4);
                frame::encode_typing(&mut f, &me, typing);
                shard.route(&target, Delivery::relay(f));
            }
            V2Client::StatusQuery { user } => {
                self.logged_in_user()?;
                shard.send_shard(
                    owner_of(&user, shard.nshards),
                    ShardMsg::StatusQuery {
                        user,
                        shard: shard.id,
                        conn: self.c.id,
                    },
                );
            }
            V2Client::Ping { nonce } => self.reply_v2(&ServerFrame::Pong { nonce }),
            V2Client::Pong { .. } => {}
            V2Client::PrekeyUpload { bundle } => {
                let me = self.logged_in_user()?;
                if crate::protocol::cbor::check_map(&bundle).is_err() {
                    return self.error_v2(ErrorCode::BadPayload, 0);
                }
                shard.push_core(CoreRequest::PutPrekeys { user: me, bundle });
            }
            V2Client::PrekeyFetch { user } => {
                self.logged_in_user()?;
                if !self.prekey_fetch_admitted() {
                    return Ok(());
                }
                if let Some(v2) = self.c.st.borrow_mut().v2.as_mut() {
                    v2.prekey_users.push_back(user.clone());
                }
                shard.push_core_with_reply(CoreRequest::FetchPrekeys {
                    user,
                    conn: self.c.id,
                });
            }
        }
        Ok(())
    }

    /// v2 keepalive: a client silent for three ping intervals is closed, one silent for one
    /// interval gets a PING.
    fn keepalive(&self) -> Step {
        let every = Duration::from_millis(u64::from(self.shard.cfg.v2.ping_interval_ms));
        let silent = {
            let st = self.c.st.borrow();
            st.v2.as_ref().map(|v| v.last_in.elapsed())
        };
        let Some(silent) = silent else {
            return Step::More;
        };
        if silent >= every * 3 {
            ShardMetrics::inc(&self.shard.metrics.idle_timeouts_total);
            debug!(
                shard = self.shard.id,
                conn = self.c.id,
                "v2 keepalive timeout"
            );
            return self.close_with_v2(&ServerFrame::error(ErrorCode::IdleTimeout, 0));
        }
        if silent >= every {
            let nonce = {
                let mut st = self.c.st.borrow_mut();
                let v2 = st.v2.as_mut().expect("checked above");
                v2.ping_nonce += 1;
                v2.ping_nonce
            };
            self.reply_v2(&ServerFrame::Ping { nonce });
        }
        Step::More
    }

    fn logged_in_user(&self) -> Result<Vec<u8>, Step> {
        self.c
            .user()
            .ok_or_else(|| self.close_with(&error_frame("not_logged_in")))
    }

    /// Accepts one message from the logged-in sender for `target`.
    /// `kind` is the payload's v2 kind (0 plain, 1 CBOR, 2 E2EE inner frame). A v1 message is
    /// routed live beside its store request; a v2 SEND ([`Conn::sending`]) only once the core
    /// confirmed it durable and not a resend (`Shard::confirmed`), which also answers SEND_ACK.
    fn accept_message(&self, sender: &[u8], target: &[u8], payload: &[u8], kind: u8) {
        let shard = &self.shard;
        let id = shard
            .idgen
            .borrow_mut()
            .next_id_above(self.id_floor.replace(0));
        // The v1 frame, then the sender's name for v2 recipients (see `Delivery::frame`).
        let sender_len = u16::try_from(sender.len()).unwrap_or(0);
        let mut f = Vec::with_capacity(payload.len() + 23 + usize::from(sender_len));
        frame::encode_reliable(&mut f, MsgId(id), payload);
        if sender_len > 0 {
            f.extend_from_slice(sender);
        }
        let client = self.sending.map(|(client, _)| client);
        shard.push_core(CoreRequest::Store {
            msg: StoredMsg {
                id,
                recipient: target.to_vec(),
                sender: sender.to_vec(),
                payload: payload.to_vec(),
                kind,
            },
            conn: self.c.id,
            client,
            accepted: Instant::now(),
        });
        ShardMetrics::inc(&shard.metrics.messages_accepted_total);
        let d = Delivery {
            id: Some(id),
            frame: f,
            meta: Meta { sender_len, kind },
        };
        match client {
            Some(client) => {
                if let Some(v2) = self.c.st.borrow_mut().v2.as_mut() {
                    v2.unconfirmed += 1;
                }
                shard.await_confirm(self.c.id, client, id, target, d);
            }
            None => shard.route_after_store(target, d),
        }
    }

    fn handle(&mut self, f: ClientFrame<'_>) -> Result<(), Step> {
        let shard = self.shard.clone();
        match f {
            ClientFrame::Login { body } => return self.login(body),
            ClientFrame::Send { target, msg } | ClientFrame::SendSeq { target, msg, .. } => {
                let me = self.logged_in_user()?;
                if self.send_admitted(&me) {
                    self.accept_message(&me, target, msg, 0);
                }
            }
            ClientFrame::CborMsg { target, cbor } => {
                let me = self.logged_in_user()?;
                if self.send_admitted(&me) {
                    self.accept_message(&me, target, cbor, 1);
                }
            }
            ClientFrame::BatchSend { target, blob } => {
                let me = self.logged_in_user()?;
                for msg in frame::batch_entries(blob) {
                    // The entries after a refused one are refused with it (one answer).
                    if !self.send_admitted(&me) {
                        break;
                    }
                    self.accept_message(&me, target, msg, 0);
                }
            }
            ClientFrame::E2eeMsg {
                recipient,
                header,
                ciphertext,
            } => {
                let me = self.logged_in_user()?;
                if !self.send_admitted(&me) {
                    return Ok(());
                }
                let mut inner = Vec::with_capacity(me.len() + header.len() + ciphertext.len() + 8);
                frame::encode_e2ee_delivery(&mut inner, &me, header, ciphertext);
                self.accept_message(&me, recipient, &inner, 2);
            }
            ClientFrame::Ack { id } => {
                let me = self.logged_in_user()?;
                ShardMetrics::inc(&shard.metrics.acks_total);
                if minted_in_the_future(id.0, shard.idgen.borrow().high_water()) {
                    // No edge has minted it: it was never delivered. Not worth a tombstone.
                    ShardMetrics::inc(&shard.metrics.acks_dropped_total);
                    return Ok(());
                }
                shard.push_core(CoreRequest::Ack { user: me, id: id.0 });
            }
            ClientFrame::GetStatus { target } => {
                self.logged_in_user()?;
                let owner = owner_of(target, shard.nshards);
                shard.send_shard(
                    owner,
                    ShardMsg::StatusQuery {
                        user: target.to_vec(),
                        shard: shard.id,
                        conn: self.c.id,
                    },
                );
            }
            ClientFrame::Typing { target, on } => {
                let me = self.logged_in_user()?;
                if !self.typing_allowed() {
                    return Ok(());
                }
                let mut f = Vec::with_capacity(me.len() + 4);
                frame::encode_typing(&mut f, &me, on);
                shard.route(target, Delivery::relay(f));
            }
            ClientFrame::ReadReceipt { id, sender } => {
                let me = self.logged_in_user()?;
                if !self.typing_allowed() {
                    return Ok(());
                }
                let mut f = Vec::with_capacity(id.len() + me.len() + 13);
                let now_ms = crate::idgen::now_micros() / 1000;
                frame::encode_receipt_relay(&mut f, id, &me, now_ms);
                shard.route(sender, Delivery::relay(f));
            }
            ClientFrame::UploadPrekeys { bundle } => {
                let me = self.logged_in_user()?;
                shard.push_core(CoreRequest::PutPrekeys {
                    user: me,
                    bundle: bundle.to_vec(),
                });
            }
            ClientFrame::FetchPrekeys { user } => {
                self.logged_in_user()?;
                if !self.prekey_fetch_admitted() {
                    return Ok(());
                }
                shard.push_core_with_reply(CoreRequest::FetchPrekeys {
                    user: user.to_vec(),
                    conn: self.c.id,
                });
            }
            ClientFrame::Group { .. } => {
                self.logged_in_user()?;
                self.error_reply("group_service_unavailable");
            }
        }
        Ok(())
    }

    fn login(&mut self, body: &[u8]) -> Result<(), Step> {
        let shard = self.shard.clone();
        let (user, token) = auth::split_login(body);
        if user.is_empty() || user.len() > shard.limits.max_target_bytes {
            ShardMetrics::inc(&shard.metrics.logins_refused_total);
            return Err(self.fail(&ProtoError::EmptyLogin));
        }
        if self.login_admitted().is_err() {
            return Err(self.close_with(frame::RATE_LIMITED_TEXT));
        }
        if let Some(verifier) = &shard.auth {
            let now_ms = crate::idgen::now_micros() / 1000;
            if let Err(e) = verifier.verify(user, token, now_ms) {
                ShardMetrics::inc(&shard.metrics.logins_refused_total);
                debug!(shard = shard.id, conn = self.c.id, error = %e, "login refused");
                return Err(self.close_with(frame::AUTH_FAILED));
            }
        }
        self.register(user)
    }

    /// Starts the session of `user` (authenticated): registers it with the user's presence
    /// owner, whose answer writes LOGIN_OK (HELLO_OK) and starts the drain.
    fn register(&mut self, user: &[u8]) -> Result<(), Step> {
        let shard = self.shard.clone();
        let (previous, drained_empty) = {
            let mut st = self.c.st.borrow_mut();
            let prev = st.user.replace(user.to_vec());
            let drained_empty = std::mem::take(&mut st.drained_empty);
            // Embedded core only: it answers every drain, in order. A cluster's answers cross
            // the bus, where one could be lost and the new drain would wait for ever; an old
            // answer taken there is safe (docs/ARCHITECTURE.md, "Login and the drain").
            let stale = match st.drain.as_ref() {
                Some(d) if !shard.cluster => d.stale + u32::from(d.requested),
                _ => 0,
            };
            st.drain = Some(DrainState::new(user, stale));
            st.recent = None;
            // LOGIN_OK is written when the owner answers `Registered` (start_drain).
            st.registering = true;
            (prev, drained_empty)
        };
        match previous {
            Some(prev) => shard.send_shard(
                owner_of(&prev, shard.nshards),
                ShardMsg::Unregister {
                    user: prev,
                    shard: shard.id,
                    conn: self.c.id,
                    drained_empty,
                },
            ),
            None => ShardMetrics::inc(&shard.metrics.sessions_open),
        }
        ShardMetrics::inc(&shard.metrics.logins_total);
        self.id_floor.set(shard.idgen.borrow().high_water());
        shard.send_shard(
            owner_of(user, shard.nshards),
            ShardMsg::Register {
                user: user.to_vec(),
                shard: shard.id,
                conn: self.c.id,
            },
        );
        Ok(())
    }
}

pub(super) fn error_frame(reason: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(reason.len() + 3);
    frame::encode_error(&mut f, reason);
    f
}

/// Ids whose time lies more than this beyond now were never minted (by any edge whose clock is
/// within this of ours).
const ACK_FUTURE_SLACK_MICROS: u64 = 60_000_000;

/// True for an id no edge can have minted yet: its time (see `idgen.rs`) is more than
/// [`ACK_FUTURE_SLACK_MICROS`] ahead of this edge's clock, or of `high_tick` (the edge's id
/// high-water tick: under a sustained burst of more than one id per 16 µs tick the edge's own
/// ids run ahead of its clock, and their acks must still count). A random 16-hex-digit id is
/// one with a probability of about nine in ten.
fn minted_in_the_future(id: u64, high_tick: u64) -> bool {
    let tick_micros = |tick: u64| {
        tick.saturating_mul(iris_bus::hops::ID_TICK_MICROS)
            .saturating_add(iris_bus::hops::ID_EPOCH_MICROS)
    };
    let micros = tick_micros(id >> iris_bus::hops::ID_LOW_BITS);
    let newest = crate::idgen::now_micros().max(tick_micros(high_tick));
    micros > newest.saturating_add(ACK_FUTURE_SLACK_MICROS)
}

/// Drops the written head of an output queue once it is at least as long as the unsent tail
/// (amortised: each byte is moved at most once per time it is written), and hands back the
/// memory of a queue that shrank, so a client that always leaves a little unread holds about
/// twice its unsent bytes, never everything ever written to it.
fn compact_out(out: &mut Vec<u8>, pos: &mut usize) {
    if *pos == 0 || *pos < out.len() - *pos {
        return;
    }
    out.drain(..*pos);
    *pos = 0;
    if out.capacity() > 256 << 10 && out.len() < out.capacity() / 4 {
        out.shrink_to((out.len() * 2).max(64 << 10));
    }
}

/// A connection whose socket took none of its queued output for this long is stuck: the output
/// budget keeper closes such connections before any that is still being written to.
pub const OUTPUT_STUCK: Duration = Duration::from_secs(1);

/// How long a closing TLS or WebSocket connection gets to send its close frame / close_notify.
const TRANSPORT_CLOSE_TIMEOUT: Duration = Duration::from_millis(200);

/// Serves one accepted socket until it closes. `peer`: the client's address, as the accept
/// returned it (the per-address login limit keys on it; `TCP_NODELAY` came from the listener).
pub async fn run(
    shard: Rc<Shard>,
    mut stream: Transport,
    id: ConnId,
    proto: Proto,
    peer: Option<std::net::IpAddr>,
) {
    let c = Rc::new(ConnShared::new(id, proto));
    shard.conns.borrow_mut().insert(id, c.clone());
    ShardMetrics::inc(&shard.metrics.connections_open);
    let mut conn = Conn {
        shard: shard.clone(),
        c: c.clone(),
        login_settled: false,
        settle_started: false,
        limits: None,
        relays_told: false,
        peer,
        id_floor: Cell::new(0),
        sending: None,
    };
    let mut inbuf: Vec<u8> = Vec::new();
    let mut timers = Timers {
        ping: None,
        login: Some(Box::pin(Timer::new(Duration::from_millis(
            shard.cfg.login_timeout_ms,
        )))),
        settle: None,
        backoff: None,
        idle: None,
    };
    loop {
        let ev =
            std::future::poll_fn(|cx| c.poll_io(cx, &shard, &mut stream, &mut inbuf, &mut timers))
                .await;
        let step = match ev {
            Io::Data => {
                {
                    let mut st = c.st.borrow_mut();
                    let now = Instant::now();
                    st.progress = now;
                    if let Some(v2) = st.v2.as_mut() {
                        v2.last_in = now;
                    }
                }
                conn.process(&mut inbuf)
            }
            Io::Ping => conn.keepalive(),
            Io::Recheck => conn.process(&mut inbuf),
            Io::IdleCheck => conn.idle_check(!inbuf.is_empty()),
            Io::Stalled => Step::More,
            Io::Settled => {
                conn.login_settled = true;
                conn.process(&mut inbuf)
            }
            Io::LoginTimeout => {
                if !c.logged_in() {
                    conn.close_with(&error_frame(if proto == Proto::V2 {
                        "hello_timeout"
                    } else {
                        "login_timeout"
                    }))
                } else {
                    Step::More
                }
            }
            Io::Eof | Io::Closed => break,
            Io::Failed(e) => {
                debug!(shard = shard.id, conn = id, error = %e, "socket error");
                break;
            }
        };
        match step {
            Step::Settle if !conn.settle_started => {
                conn.settle_started = true;
                timers.settle = Some(Box::pin(Timer::new(Duration::from_micros(
                    shard.cfg.login_settle_us,
                ))));
            }
            _ => {}
        }
        if timers.login.is_some() && c.logged_in() {
            timers.login = None;
        }
        glommio::yield_if_needed().await;
    }
    // The session ends: presence learns it, whatever was not acked stays stored. A v2
    // session's written ids go to the core for the next HELLO's resume_after.
    if let Some(user) = c.user() {
        let written =
            c.st.borrow_mut()
                .v2
                .as_mut()
                .map(|v2| Vec::from(std::mem::take(&mut v2.written)))
                .unwrap_or_default();
        if !written.is_empty() {
            shard.push_core(CoreRequest::Delivered {
                user: user.clone(),
                ids: written,
            });
        }
        ShardMetrics::dec(&shard.metrics.sessions_open);
        let drained_empty = c.st.borrow().drained_empty;
        shard.send_shard(
            owner_of(&user, shard.nshards),
            ShardMsg::Unregister {
                user,
                shard: shard.id,
                conn: id,
                drained_empty,
            },
        );
    }
    if !matches!(stream, Transport::Tcp(_)) {
        // Boxed: the close's state (a timer, the TLS or WebSocket close) would otherwise be held
        // in every connection's task, for its whole life (128 of its 616 bytes).
        Box::pin(stream.finish(TRANSPORT_CLOSE_TIMEOUT)).await;
    }
    drop(stream);
    {
        // Nothing more is queued for it (a delivery that still finds it appends nothing), and
        // what it held leaves the shard's sum.
        let mut st = c.st.borrow_mut();
        st.close = Close::Now;
        st.out = Vec::new();
        st.out_pos = 0;
        ConnShared::account(&shard, &mut st);
    }
    shard.conns.borrow_mut().remove(&id);
    ShardMetrics::dec(&shard.metrics.connections_open);
    if shard.shutting_down.get() && shard.conns.borrow().is_empty() {
        shard.conns_empty.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::compact_out;

    /// A client that always leaves a little unread: the queue holds about twice the unsent
    /// bytes, however much passed through it.
    #[test]
    fn acks_of_ids_from_the_future_are_recognised() {
        let mut g = crate::idgen::IdGen::new(0, 0, 1, 0, Default::default());
        assert!(!super::minted_in_the_future(g.next_id(), 0));
        assert!(!super::minted_in_the_future(0x0000_0000_0000_0001, 0));
        assert!(super::minted_in_the_future(u64::MAX, 0));
        assert!(super::minted_in_the_future(0x7fff_ffff_ffff_ffff, 0));
    }

    #[test]
    fn acks_of_ids_a_long_burst_ran_ahead_still_count() {
        // Regression: a shard minting 250,000 ids/s for 30 s runs 90 s ahead of the clock (one
        // tick is 16 µs); the acks of those ids were dropped as "from the future", so the
        // messages were delivered again at every login.
        let high = std::sync::Arc::new(crate::idgen::HighWater::default());
        let mut g = crate::idgen::IdGen::new(0, 0, 1, 0, high.clone());
        let now_tick = (crate::idgen::now_micros() - crate::idgen::EPOCH_MICROS) / 16;
        let ahead_90s = now_tick + 90_000_000 / 16;
        let id = g.next_id_at(now_tick, ahead_90s);
        assert!(
            super::minted_in_the_future(id, 0),
            "90 s ahead of the clock"
        );
        assert!(!super::minted_in_the_future(id, high.tick()));
        // Beyond the high-water mark by more than the slack: still refused.
        let beyond = (ahead_90s + 61_000_000 / 16) << 18;
        assert!(super::minted_in_the_future(beyond, high.tick()));
    }

    #[test]
    fn a_partly_written_queue_is_compacted() {
        let mut out = Vec::new();
        let mut pos = 0;
        let chunk = vec![7u8; 1000];
        for _ in 0..100_000 {
            compact_out(&mut out, &mut pos);
            out.extend_from_slice(&chunk);
            // The socket took all but 500 bytes.
            pos = out.len() - 500;
        }
        assert!(out.len() - pos == 500);
        assert!(out.len() <= 3_000, "queue holds {} bytes", out.len());
        assert!(out.capacity() <= 512 << 10, "capacity {}", out.capacity());
        // The unsent bytes survive compaction, in order.
        let mut out: Vec<u8> = (0..=255).collect();
        let mut pos = 200;
        compact_out(&mut out, &mut pos);
        assert_eq!((pos, out), (0, (200..=255).collect::<Vec<u8>>()));
    }
}
