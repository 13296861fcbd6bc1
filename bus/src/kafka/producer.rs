//! The Kafka producer thread and the rings that feed it from the shards.
//!
//! One OS thread owns one rdkafka `BaseProducer` and drains the [`ProducerRing`]s round-robin
//! into it, polling it for delivery reports between batches. Nothing here blocks a shard:
//! [`ProducerRing::try_send`] is a push onto a bounded lock-free queue.
//!
//! Backpressure: rdkafka holds at most `queue_max_messages` / `queue_max_kbytes`; past that
//! `send` answers `QueueFull`. The thread then keeps the refused frame (in order, first in
//! its `pending` queue), stops draining the rings and only polls; the rings fill and the
//! shards see their `try_send` refused (counted as `ring_full`). Memory is bounded by the
//! rings plus rdkafka's queue plus one frame. When deliveries resume the pending frames go
//! first, then the rings again. Each blocked stretch counts one `queue_full_events`; the first
//! one, and any that lasts over [`LONG_BLOCK`], is logged at WARN with its recovery at INFO.
//!
//! Delivery errors (only after librdkafka gave up on its own retries: with
//! `message_timeout_ms = 0` that means a fatal idempotence error or a purge) are counted and
//! the frame is sent again, never dropped silently. Only frames that can never be produced
//! (larger than the broker accepts, partition out of range) are dropped, counted as
//! `rejected` and logged (the first at ERROR). A re-sent frame may land after later frames of its
//! partition and may be a duplicate: delivery is at-least-once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::queue::{ArrayQueue, SegQueue};
use crossbeam::utils::CachePadded;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::{KafkaConfig, TransportError};

/// The longest the idle producer thread sleeps between looks at rdkafka's events.
const IDLE_PARK: Duration = Duration::from_millis(100);
/// A blocked stretch longer than this is logged at WARN even after the first one.
const LONG_BLOCK: Duration = Duration::from_secs(5);
/// Frames taken from one ring before moving on to the next.
const RING_BUDGET: usize = 1024;
/// Frames moved from the rings between two polls of rdkafka (delivery reports wait meanwhile).
const DRAIN_BUDGET: usize = 8 * RING_BUDGET;

/// One record for the producer: the topic, its partition (chosen by the caller with the bus
/// partition function), an optional key, the encoded frame, and a ticket.
///
/// `ticket` is the caller's name for the frame, or [`NO_TICKET`] (0). A frame with a ticket is
/// reported once through [`ProducerRing::take_done`] when the producer is done with it: the
/// broker acknowledged it (acks=all), or it can never be produced (counted as `rejected`). A
/// frame whose delivery failed otherwise is sent again with its ticket and reported only then.
/// The edge's outbox trims on these reports; the core commits offsets on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub topic: Arc<str>,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub ticket: u64,
}

/// The ticket of a frame whose fate nobody waits for.
pub const NO_TICKET: u64 = 0;

/// What became of a ticketed frame (see [`OutFrame::ticket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub ticket: u64,
    /// True when the broker acknowledged the frame; false when it can never be produced.
    pub acked: bool,
}

/// Counters of one ring, each on its own cache line: only its shard writes them.
#[derive(Debug)]
struct Ring {
    queue: ArrayQueue<OutFrame>,
    frames_in: CachePadded<AtomicU64>,
    ring_full: CachePadded<AtomicU64>,
}

/// A shard's way into the producer thread. Never blocks; meant for one sending shard (it is
/// safe with more, only slower).
#[derive(Debug, Clone)]
pub struct ProducerRing {
    ring: Arc<Ring>,
    shared: Arc<Shared>,
}

impl ProducerRing {
    /// Queues `frame` for the producer thread, or gives it back when the ring is full (the
    /// broker is slow or down: back off, shed or hold it) or the producer has stopped.
    pub fn try_send(&self, frame: OutFrame) -> Result<(), OutFrame> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(frame);
        }
        match self.ring.queue.push(frame) {
            Ok(()) => {
                self.ring.frames_in.fetch_add(1, Ordering::Relaxed);
                // Pairs with the worker's SeqCst store of `sleeping` before its last look at the
                // rings: either it sees this frame, or this load sees it asleep and wakes it.
                if self.shared.sleeping.load(Ordering::SeqCst) {
                    if let Some(t) = self.shared.thread.get() {
                        t.unpark();
                    }
                }
                Ok(())
            }
            Err(frame) => {
                self.ring.ring_full.fetch_add(1, Ordering::Relaxed);
                Err(frame)
            }
        }
    }

    /// Frames waiting in this ring.
    pub fn len(&self) -> usize {
        self.ring.queue.len()
    }

    /// True when no frame waits in this ring.
    pub fn is_empty(&self) -> bool {
        self.ring.queue.is_empty()
    }

    /// Frames this ring holds at most.
    pub fn capacity(&self) -> usize {
        self.ring.queue.capacity()
    }

    /// Moves the reports of ticketed frames (of every ring of this producer) into `out`, in the
    /// order the producer made them; returns how many. Never blocks.
    pub fn take_done(&self, out: &mut Vec<Done>) -> usize {
        let mut n = 0;
        while let Some(d) = self.shared.done.pop() {
            out.push(d);
            n += 1;
        }
        n
    }
}

/// State shared by the producer thread, its delivery callback, the rings and the handle.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// The worker is parked (idle: empty rings, nothing in flight); a push must unpark it.
    sleeping: AtomicBool,
    /// The worker thread, for [`ProducerRing::try_send`] to unpark.
    thread: std::sync::OnceLock<thread::Thread>,
    closed: AtomicBool,
    /// Milliseconds after `stop` was set that the thread may keep flushing.
    flush_ms: AtomicU64,
    produced_ok: AtomicU64,
    delivery_errors: AtomicU64,
    rejected: AtomicU64,
    queue_full_events: AtomicU64,
    in_flight: AtomicU64,
    pending: AtomicU64,
    client_errors: AtomicU64,
    logged_delivery_error: AtomicBool,
    logged_rejected: AtomicBool,
    /// Frames whose delivery failed, to be sent again (filled by the delivery callback, which
    /// runs on the producer thread inside `poll`: the lock is never contended).
    retry: Mutex<Vec<OutFrame>>,
    /// Reports of ticketed frames, taken by [`ProducerRing::take_done`]. At most one entry per
    /// ticketed frame handed to a ring, so it is bounded by what the callers keep in flight.
    done: SegQueue<Done>,
}

impl Shared {
    /// Reports the fate of a ticketed frame.
    fn report(&self, ticket: u64, acked: bool) {
        if ticket != NO_TICKET {
            self.done.push(Done { ticket, acked });
        }
    }

    /// Counts a frame that can never be produced; logs the first at ERROR, the rest at DEBUG.
    fn reject(&self, error: &KafkaError, frame: &OutFrame) {
        self.report(frame.ticket, false);
        let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.logged_rejected.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error = %error,
                topic = %frame.topic,
                partition = frame.partition,
                len = frame.payload.len(),
                "kafka frame can never be produced, dropped (logged once, counted after)"
            );
        } else {
            tracing::debug!(error = %error, topic = %frame.topic, rejected = n, "kafka frame can never be produced, dropped");
        }
    }
}

/// A snapshot of the producer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Frames accepted by the rings.
    pub frames_in: u64,
    /// Frames acknowledged by the broker (acks=all).
    pub produced_ok: u64,
    /// Failed deliveries (each was sent again unless counted in `rejected` too).
    pub delivery_errors: u64,
    /// Frames dropped because they can never be produced (the first logged at ERROR).
    pub rejected: u64,
    /// Stretches during which rdkafka's queue was full and the rings were not drained.
    pub queue_full_events: u64,
    /// Frames handed to rdkafka and not yet acknowledged.
    pub in_flight: u64,
    /// Frames held by the producer thread (refused with `QueueFull`, or to be re-sent).
    pub pending: u64,
    /// `try_send` calls refused because the ring was full.
    pub ring_full: u64,
    /// Client-level errors rdkafka reported (broker down, transport failures).
    pub client_errors: u64,
}

// Tickets travel through rdkafka as a `usize` opaque value (see `Ctx`): 64-bit targets only.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("the Kafka producer carries u64 tickets as usize: build for a 64-bit target");

/// The rdkafka context: counts delivery reports and keeps failed frames for a re-send.
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.client_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %error, reason, "kafka producer client error");
    }
}

impl ProducerContext for Ctx {
    /// The frame's ticket ([`OutFrame::ticket`]; a `usize` because rdkafka carries it as a
    /// pointer-sized opaque value; tickets fit, the producer only builds on 64-bit targets).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let ticket = ticket as u64;
        match result {
            Ok(_) => {
                self.shared.produced_ok.fetch_add(1, Ordering::Relaxed);
                self.shared.report(ticket, true);
            }
            Err((error, msg)) => {
                self.shared.delivery_errors.fetch_add(1, Ordering::Relaxed);
                let frame = OutFrame {
                    topic: Arc::from(msg.topic()),
                    partition: msg.partition(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    ticket,
                };
                if is_permanent(error) {
                    self.shared.reject(error, &frame);
                    return;
                }
                if !self
                    .shared
                    .logged_delivery_error
                    .swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        error = %error,
                        topic = %frame.topic,
                        partition = frame.partition,
                        "kafka delivery failed, frame sent again (logged once, counted after)"
                    );
                } else {
                    tracing::debug!(error = %error, topic = %frame.topic, "kafka delivery failed, frame sent again");
                }
                self.shared.retry.lock().unwrap().push(frame);
            }
        }
    }
}

/// Errors after which sending the same frame again can never succeed.
fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = cfg.base_client_config();
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_bytes.to_string())
        .set("compression.type", &cfg.compression)
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            cfg.queue_max_kbytes.to_string(),
        );
    c
}

fn create_producer(cfg: &KafkaConfig, shared: &Arc<Shared>) -> KafkaResult<BaseProducer<Ctx>> {
    producer_config(cfg).create_with_context(Ctx {
        shared: Arc::clone(shared),
    })
}

/// The handle of the producer thread. Dropping it stops the thread without waiting for
/// deliveries; call [`KafkaProducer::flush_and_stop`] to wait.
#[derive(Debug)]
pub struct KafkaProducer {
    shared: Arc<Shared>,
    rings: Vec<Arc<Ring>>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaProducer {
    /// Creates the producer and its thread, with `rings` rings of
    /// [`KafkaConfig::ring_capacity`] frames (one per sending shard).
    pub fn start(
        cfg: &KafkaConfig,
        rings: usize,
    ) -> Result<(KafkaProducer, Vec<ProducerRing>), TransportError> {
        let shared = Arc::new(Shared::default());
        let producer = create_producer(cfg, &shared).map_err(TransportError::Config)?;
        let ring_list: Vec<Arc<Ring>> = (0..rings.max(1))
            .map(|_| {
                Arc::new(Ring {
                    queue: ArrayQueue::new(cfg.ring_capacity.max(1)),
                    frames_in: CachePadded::new(AtomicU64::new(0)),
                    ring_full: CachePadded::new(AtomicU64::new(0)),
                })
            })
            .collect();
        let mut worker = Worker {
            cfg: cfg.clone(),
            producer,
            rings: ring_list.clone(),
            shared: Arc::clone(&shared),
            pending: VecDeque::new(),
            next_ring: 0,
            blocked_since: None,
            long_block_logged: false,
            episodes_logged: 0,
        };
        let cpu = cfg.producer_cpu;
        let thread = thread::Builder::new()
            .name("iris-kafka-producer".to_owned())
            .spawn(move || {
                if let Some(id) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        tracing::warn!(cpu = id, "kafka producer thread could not be pinned");
                    }
                }
                worker.run();
            })
            .map_err(TransportError::Thread)?;
        let _ = shared.thread.set(thread.thread().clone());
        let handles = ring_list
            .iter()
            .map(|ring| ProducerRing {
                ring: Arc::clone(ring),
                shared: Arc::clone(&shared),
            })
            .collect();
        Ok((
            KafkaProducer {
                shared,
                rings: ring_list,
                thread: Some(thread),
            },
            handles,
        ))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProducerStats {
        let s = &self.shared;
        let mut out = ProducerStats {
            produced_ok: s.produced_ok.load(Ordering::Relaxed),
            delivery_errors: s.delivery_errors.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            queue_full_events: s.queue_full_events.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            pending: s.pending.load(Ordering::Relaxed),
            client_errors: s.client_errors.load(Ordering::Relaxed),
            ..ProducerStats::default()
        };
        for r in &self.rings {
            out.frames_in += r.frames_in.load(Ordering::Relaxed);
            out.ring_full += r.ring_full.load(Ordering::Relaxed);
        }
        out
    }

    /// Stops accepting frames, produces everything the rings and rdkafka still hold and waits
    /// for the broker's acknowledgements, at most `timeout`; then stops the thread.
    ///
    /// Call it after the shards stopped sending: a frame pushed while the thread makes its
    /// last pass may stay in its ring. Fails with [`TransportError::FlushTimeout`] when
    /// frames were still unacknowledged at the deadline (they are lost with the process).
    pub fn flush_and_stop(mut self, timeout: Duration) -> Result<ProducerStats, TransportError> {
        self.stop(timeout)?;
        let stats = self.stats();
        let remaining = stats.in_flight + stats.pending;
        if remaining > 0 {
            return Err(TransportError::FlushTimeout { remaining });
        }
        Ok(stats)
    }

    fn stop(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared
            .flush_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
        self.shared.stop.store(true, Ordering::Release);
        thread.thread().unpark();
        thread.join().map_err(|_| TransportError::ThreadPanicked)
    }
}

impl Drop for KafkaProducer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop(Duration::ZERO);
            let s = self.stats();
            if s.in_flight + s.pending > 0 {
                tracing::warn!(
                    in_flight = s.in_flight,
                    pending = s.pending,
                    "kafka producer dropped without flush, frames not acknowledged"
                );
            }
        }
    }
}

/// What one `send` attempt did with a frame.
enum Sent {
    Ok,
    /// rdkafka's queue is full: the frame is given back.
    Full(OutFrame),
    /// Some other refusal (unknown topic yet...): the frame is given back, try later.
    Later(OutFrame),
}

/// The state of the producer thread.
struct Worker {
    cfg: KafkaConfig,
    producer: BaseProducer<Ctx>,
    rings: Vec<Arc<Ring>>,
    shared: Arc<Shared>,
    /// Frames taken from the rings (or failed) and not yet accepted by rdkafka, in order.
    pending: VecDeque<OutFrame>,
    next_ring: usize,
    blocked_since: Option<Instant>,
    long_block_logged: bool,
    episodes_logged: u64,
}

impl Worker {
    fn run(&mut self) {
        let mut stop_at: Option<Instant> = None;
        loop {
            if stop_at.is_none() && self.shared.stop.load(Ordering::Acquire) {
                let ms = self.shared.flush_ms.load(Ordering::Relaxed);
                stop_at = Some(Instant::now() + Duration::from_millis(ms));
                self.shared.closed.store(true, Ordering::Release);
            }
            self.take_retries();
            let mut progressed = self.send_pending();
            let blocked = !self.pending.is_empty();
            if !blocked {
                progressed |= self.drain_rings();
            }
            self.update_blocked();
            if self.producer.client().fatal_error().is_some() {
                self.recreate_producer();
            }
            let wait = if self.blocked_since.is_some() {
                Duration::from_millis(5)
            } else if progressed {
                Duration::ZERO
            } else {
                Duration::from_millis(1)
            };
            // One non-blocking pass over rdkafka's events (delivery reports). rdkafka-rs turns
            // a poll timeout into whole milliseconds for librdkafka and loops until the
            // deadline, so `poll(1 ms)` spins for the whole millisecond: the thread waits in
            // `park_timeout` instead, where a push to a ring wakes it at once.
            self.producer.poll(Duration::ZERO);
            let in_flight = self.producer.in_flight_count().max(0) as u64;
            if !progressed
                && stop_at.is_none()
                && in_flight == 0
                && self.pending.is_empty()
                && self.blocked_since.is_none()
            {
                self.park_while_idle(IDLE_PARK);
            } else if self.blocked_since.is_some() {
                // rdkafka's queue is full: the rings wait anyway; a stop unparks.
                thread::park_timeout(wait);
            } else if !wait.is_zero() {
                self.park_while_idle(wait);
            }
            self.shared.in_flight.store(in_flight, Ordering::Relaxed);
            self.shared
                .pending
                .store(self.pending.len() as u64, Ordering::Relaxed);
            if let Some(at) = stop_at {
                let idle = in_flight == 0
                    && self.pending.is_empty()
                    && self.rings.iter().all(|r| r.queue.is_empty())
                    && self.shared.retry.lock().unwrap().is_empty();
                if idle || Instant::now() >= at {
                    // Count what the rings still hold as pending so a flush timeout reports it.
                    let left: usize = self.rings.iter().map(|r| r.queue.len()).sum();
                    self.shared
                        .pending
                        .store((self.pending.len() + left) as u64, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Nothing to move right now: sleep until a ring gets a frame (the pushing shard unparks
    /// us), a stop, or `timeout` (then rdkafka's events are served: delivery reports while
    /// frames are in flight, client events when idle).
    fn park_while_idle(&self, timeout: Duration) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let idle = self.rings.iter().all(|r| r.queue.is_empty())
            && self.shared.retry.lock().is_ok_and(|r| r.is_empty())
            && !self.shared.stop.load(Ordering::SeqCst);
        if idle {
            thread::park_timeout(timeout);
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }

    /// Puts the frames whose delivery failed first in line (they are older than `pending`).
    fn take_retries(&mut self) {
        let mut retry = std::mem::take(&mut *self.shared.retry.lock().unwrap());
        if retry.is_empty() {
            return;
        }
        retry.extend(self.pending.drain(..));
        self.pending = retry.into();
    }

    fn send(&self, frame: OutFrame) -> Sent {
        let mut record = BaseRecord::with_opaque_to(&frame.topic, frame.ticket as usize)
            .partition(frame.partition)
            .payload(&frame.payload);
        if let Some(key) = &frame.key {
            record = record.key(key);
        }
        match self.producer.send(record) {
            Ok(()) => Sent::Ok,
            Err((e, _)) => match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::QueueFull) => Sent::Full(frame),
                _ if is_permanent(&e) => {
                    self.shared.reject(&e, &frame);
                    Sent::Ok
                }
                _ => {
                    self.shared.delivery_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, topic = %frame.topic, "kafka send refused, frame kept");
                    Sent::Later(frame)
                }
            },
        }
    }

    /// Sends the held frames in order until rdkafka refuses one. True if any went out.
    fn send_pending(&mut self) -> bool {
        let mut progressed = false;
        while let Some(frame) = self.pending.pop_front() {
            match self.send(frame) {
                Sent::Ok => progressed = true,
                Sent::Full(frame) => {
                    self.pending.push_front(frame);
                    break;
                }
                Sent::Later(frame) => {
                    self.pending.push_front(frame);
                    // Give the broker's metadata time rather than spin on the refusal.
                    self.producer.poll(Duration::from_millis(50));
                    break;
                }
            }
        }
        progressed
    }

    /// Moves frames from the rings, round-robin, into rdkafka until they are empty, rdkafka
    /// refuses one (kept first in `pending`; draining stops there) or [`DRAIN_BUDGET`] frames
    /// moved. True if any went out.
    fn drain_rings(&mut self) -> bool {
        let n = self.rings.len();
        let mut progressed = false;
        let mut empty_in_a_row = 0;
        let mut moved = 0;
        while empty_in_a_row < n && moved < DRAIN_BUDGET {
            let ring = Arc::clone(&self.rings[self.next_ring]);
            self.next_ring = (self.next_ring + 1) % n;
            let mut taken = 0;
            while taken < RING_BUDGET {
                let Some(frame) = ring.queue.pop() else { break };
                taken += 1;
                match self.send(frame) {
                    Sent::Ok => progressed = true,
                    Sent::Full(frame) | Sent::Later(frame) => {
                        self.pending.push_back(frame);
                        return progressed;
                    }
                }
            }
            moved += taken;
            if taken == 0 {
                empty_in_a_row += 1;
            } else {
                empty_in_a_row = 0;
            }
        }
        progressed
    }

    /// Counts and logs the start and the end of blocked stretches.
    fn update_blocked(&mut self) {
        let blocked = !self.pending.is_empty();
        match (self.blocked_since, blocked) {
            (None, true) => {
                self.blocked_since = Some(Instant::now());
                self.long_block_logged = false;
                let n = self
                    .shared
                    .queue_full_events
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                let in_flight = self.producer.in_flight_count();
                if self.episodes_logged == 0 {
                    self.episodes_logged += 1;
                    self.long_block_logged = true;
                    tracing::warn!(
                        in_flight,
                        queue_full_events = n,
                        "kafka producer queue full (broker slow or down): rings no longer drained, shards will see full rings"
                    );
                } else {
                    tracing::debug!(
                        in_flight,
                        queue_full_events = n,
                        "kafka producer queue full"
                    );
                }
            }
            (Some(since), true) => {
                if !self.long_block_logged && since.elapsed() >= LONG_BLOCK {
                    self.long_block_logged = true;
                    tracing::warn!(
                        blocked_ms = since.elapsed().as_millis() as u64,
                        in_flight = self.producer.in_flight_count(),
                        "kafka producer blocked on a full queue (broker slow or down)"
                    );
                }
            }
            (Some(since), false) => {
                self.blocked_since = None;
                let blocked_ms = since.elapsed().as_millis() as u64;
                if self.long_block_logged {
                    tracing::info!(blocked_ms, "kafka producer recovered, draining rings again");
                } else {
                    tracing::debug!(blocked_ms, "kafka producer queue has room again");
                }
                self.long_block_logged = false;
            }
            (None, false) => {}
        }
    }

    /// After a fatal (idempotence) error the producer is unusable: take back everything it
    /// holds as failed deliveries (re-sent) and start a new one.
    fn recreate_producer(&mut self) {
        let (code, reason) = self
            .producer
            .client()
            .fatal_error()
            .unwrap_or((RDKafkaErrorCode::Fatal, String::new()));
        tracing::error!(code = %code, reason = %reason, "kafka producer fatal error, recreating the producer");
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(10));
        }
        match create_producer(&self.cfg, &self.shared) {
            Ok(p) => self.producer = p,
            Err(e) => {
                tracing::error!(error = %e, "kafka producer could not be recreated, retrying");
                thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
