//! `pairs`: P sender → receiver pairs; every receiver acks every message.
//!
//! Pair `i` is user `{prefix}s{i}` sending to `{prefix}r{i}`; both connections live on the
//! same worker (`i % workers`). Two modes:
//!
//! - **open loop** (`--rate R`): each sender has a fixed schedule, message `k` of pair `i` is
//!   *intended* at `start + φᵢ + k·P/R` (the phases φᵢ spread the pairs evenly over one
//!   interval). A sender that wakes late (or was blocked by a full socket) sends everything that
//!   is due in one write, each message stamped with its own intended time, so the latency the
//!   receiver records (`arrival − intended`) includes every delay of the generator and the
//!   server: no coordinated omission.
//! - **closed loop** (`--max`): each pair keeps `--window` messages in flight (sent and not yet
//!   received), which finds the saturation throughput; the latency is from the actual send.
//!
//! After `--warmup` seconds the `--duration` seconds are measured: `delivered_per_s` counts
//! distinct messages received in the window, the latency histogram holds the messages intended
//! in it. Then the senders stop and the run waits (up to `--drain-timeout`) for the last
//! messages (and with v2 the last SEND_ACKs); lost = sent − distinct received, exactly, per pair. `--idle N` holds N more
//! logged-in idle connections during the whole measurement.
//!
//! With `--protocol v2` the sender writes SEND frames (kind 0, `client_msg_id` = the sequence
//! number, the same payload stamp), reads its SEND_ACKs (counted in `send_acks`; the latency
//! from the same start as the end-to-end one to the SEND_ACK is the report's
//! `send_ack_latency`: the sender's "sent" tick) and answers PINGs; the receiver acks all
//! the DELIVERs of one read in one ACK frame (1024 ids per frame at most). A SEND the server
//! refuses (ERROR or RATE_LIMITED naming it) is never delivered: it is counted (`errors`,
//! `rate_limited`) and ends up in `lost`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use anyhow::Context as _;
use clap::Args;
use glommio::sync::Semaphore;
use iris_edge::protocol::frame::ServerFrame;
use iris_edge::protocol::ClientFrame;
use serde::Serialize;

use super::super::cli::Common;
use super::super::clock;
use super::super::conn::{self, Client, LoadError, Protocol};
use super::super::payload::{self, Stamp};
use super::super::report::Report;
use super::super::runtime::WorkerEnv;
use super::super::seq::{Arrival, SeqTracker};
use super::super::stats;
use super::super::v2;
use super::{connect_login, count_error, ramp, Run, ServerNow};

/// Options of `pairs`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct PairsOpts {
    #[command(flatten)]
    pub common: Common,
    /// Sender → receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Offered rate, messages/s over all pairs (open loop).
    #[arg(long, conflicts_with = "max")]
    pub rate: Option<f64>,
    /// Closed loop: as fast as the server takes them, --window messages in flight per pair.
    #[arg(long)]
    pub max: bool,
    /// Messages in flight per pair with --max.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// Payload bytes per message (at least 22: stream, sequence number, timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before the measurement.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Idle logged-in connections held during the run.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
    /// Ramp rate of the idle connections, connections/s.
    #[arg(long, default_value_t = 10_000.0)]
    pub idle_rate: f64,
    /// Seconds to wait for the last messages after the senders stop.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Most messages in one write of a sender.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
}

const SETUP: u32 = 1;
const RUN: u32 = 2;

/// One pair's state, shared by its sender and receiver tasks.
#[derive(Debug)]
struct Pair {
    id: u32,
    sent: Cell<u64>,
    tracker: RefCell<SeqTracker>,
    /// Messages in flight allowed (closed loop only).
    window: Option<Semaphore>,
}

/// What one worker found, summed over its pairs.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    sent: u64,
    distinct: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    /// Received sequence numbers that were never sent.
    phantom: u64,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    start_ns: u64,
    measure_ns: u64,
    end_ns: u64,
}

async fn worker(env: WorkerEnv, o: PairsOpts) -> anyhow::Result<Outcome> {
    let Ok(setup_start) = env.wait_phase(SETUP).await else {
        return Ok(Outcome::default());
    };
    // Idle connections ramp in the background while the pairs connect.
    let idle_task = {
        let env = env.clone();
        let idx: Vec<usize> = env.my_share(o.idle).collect();
        let rate = o.idle_rate / env.workers as f64;
        glommio::spawn_local(
            async move { ramp(&env, idx, "i", rate, setup_start, 256, false).await },
        )
    };
    let mut conns = Vec::new();
    for i in env.my_share(o.pairs) {
        let rx_user = format!("{}r{i}", env.prefix);
        let tx_user = format!("{}s{i}", env.prefix);
        let rx = connect_login(&env, env.target(2 * i), rx_user.as_bytes())
            .await
            .with_context(|| format!("receiver {rx_user}"))?;
        let tx = connect_login(&env, env.target(2 * i + 1), tx_user.as_bytes())
            .await
            .with_context(|| format!("sender {tx_user}"))?;
        stats::add(&env.me().c.connections, 2);
        stats::add(&env.me().c.logins, 2);
        conns.push((i, rx, tx, rx_user));
    }
    let idle = idle_task.await;
    env.set_ready();
    let Ok(start_ns) = env.wait_phase(RUN).await else {
        return Ok(Outcome::default());
    };
    let measure_ns = start_ns + clock::secs_to_ns(o.warmup);
    let t = Timing {
        start_ns,
        measure_ns,
        end_ns: measure_ns + clock::secs_to_ns(o.duration),
    };
    let mut pairs = Vec::new();
    let mut tasks = Vec::new();
    for (i, rx, tx, rx_user) in conns {
        let pair = Rc::new(Pair {
            id: i as u32,
            sent: Cell::new(0),
            tracker: RefCell::new(SeqTracker::new()),
            window: o.max.then(|| Semaphore::new(o.window.max(1))),
        });
        pairs.push(pair.clone());
        let phase = match o.rate {
            Some(_) => i as f64 / o.pairs as f64,
            None => 0.0,
        };
        if env.shared.protocol == Protocol::V2 {
            tasks.push(glommio::spawn_local(receive_v2(
                env.clone(),
                rx,
                pair.clone(),
                t,
            )));
            tasks.push(glommio::spawn_local(send_v2(
                env.clone(),
                tx,
                pair,
                rx_user.into_bytes(),
                o.clone(),
                t,
                phase,
            )));
            continue;
        }
        tasks.push(glommio::spawn_local(receive(
            env.clone(),
            rx,
            pair.clone(),
            t,
        )));
        tasks.push(glommio::spawn_local(send(
            env.clone(),
            tx,
            pair,
            rx_user.into_bytes(),
            o.clone(),
            t,
            phase,
        )));
    }
    for task in tasks {
        task.await;
    }
    drop(idle);
    let mut out = Outcome::default();
    for p in pairs {
        let tr = p.tracker.borrow();
        let sent = p.sent.get();
        out.sent += sent;
        out.distinct += tr.distinct;
        out.lost += tr.lost(sent);
        out.duplicates += tr.duplicates;
        out.reordered += tr.reordered;
        if let Some(h) = tr.highest() {
            if h >= sent {
                out.phantom += h + 1 - sent;
            }
        }
    }
    Ok(out)
}

/// The sender of one pair.
async fn send(
    env: WorkerEnv,
    mut c: Client,
    pair: Rc<Pair>,
    target: Vec<u8>,
    o: PairsOpts,
    t: Timing,
    phase: f64,
) {
    let per_pair = o.rate.map(|r| r / o.pairs as f64);
    let interval = per_pair.map(|r| 1e9 / r.max(1e-9)).unwrap_or(0.0);
    let first = t.start_ns + (phase * interval) as u64;
    let intended = |k: u64| first + (k as f64 * interval) as u64;
    let max_batch = o.max_batch.max(1);
    let mut buf = Vec::with_capacity(max_batch * (o.size + target.len() + 8));
    let mut msg = Vec::with_capacity(o.size.max(payload::MIN_SIZE));
    let mut k = 0u64;
    let counters = &env.me().c;
    loop {
        if env.stopping() {
            break;
        }
        let now = clock::now_ns();
        let n = match &pair.window {
            None => {
                let next = intended(k);
                if next >= t.end_ns {
                    break;
                }
                if next > now {
                    clock::sleep_until_ns(next).await;
                    continue;
                }
                buf.clear();
                push_due(&env, t, now, k, max_batch, intended, |seq, due| {
                    push_msg(
                        &mut buf, &mut msg, &target, pair.id, seq, due, o.size, false,
                    );
                })
            }
            Some(win) => {
                if now >= t.end_ns {
                    break;
                }
                if glommio::timer::timeout(conn::POLL, win.acquire(1))
                    .await
                    .is_err()
                {
                    continue;
                }
                let extra = win.available().min(max_batch as u64 - 1);
                if extra > 0 && !win.try_acquire(extra).unwrap_or(false) {
                    continue;
                }
                let n = 1 + extra as usize;
                let now = clock::now_ns();
                buf.clear();
                for j in 0..n {
                    let seq = k + j as u64;
                    push_msg(
                        &mut buf, &mut msg, &target, pair.id, seq, now, o.size, false,
                    );
                }
                n
            }
        };
        match c.write_all(&buf).await {
            Ok(()) => {
                k += n as u64;
                pair.sent.set(k);
                stats::add(&counters.sent, n as u64);
            }
            Err(e) => {
                count_error(&env, &e);
                break;
            }
        }
        glommio::yield_if_needed().await;
    }
    stats::add(&counters.finished, 1);
    // Keep the connection until the end (closing it early is not part of the load), and count
    // what the server said to the sender (errors, rate limiting).
    while !env.stopping() {
        match c.fill().await {
            Ok(_) => drain_sender_frames(&env, &mut c),
            Err(e) => {
                count_error(&env, &e);
                break;
            }
        }
    }
}

fn drain_sender_frames(env: &WorkerEnv, c: &mut Client) {
    loop {
        match c.rx.next_frame() {
            Ok(None) => break,
            Ok(Some(ServerFrame::Error { reason })) => {
                env.me().error(&format!(
                    "sender got ERROR {}",
                    String::from_utf8_lossy(reason)
                ));
            }
            Ok(Some(ServerFrame::RateLimited { .. })) => stats::add(&env.me().c.rate_limited, 1),
            Ok(Some(_)) => stats::add(&env.me().c.unexpected, 1),
            Err(e) => {
                env.me().error(&format!("sender: bad server frame: {e}"));
                break;
            }
        }
    }
}

/// Open loop: appends (with `push(seq, intended)`) the messages from `k` on that are due by
/// `now`, at most `max_batch`, recording the sender's lag of those in the measured window;
/// returns how many.
fn push_due(
    env: &WorkerEnv,
    t: Timing,
    now: u64,
    k: u64,
    max_batch: usize,
    intended: impl Fn(u64) -> u64,
    mut push: impl FnMut(u64, u64),
) -> usize {
    let mut n = 0;
    while n < max_batch {
        let due = intended(k + n as u64);
        if due > now || due >= t.end_ns {
            break;
        }
        if due >= t.measure_ns {
            env.lag.record(now - due);
        }
        push(k + n as u64, due);
        n += 1;
    }
    n
}

/// Appends one stamped message as a v1 SEND, or with `v2` a v2 SEND whose client_msg_id is
/// the sequence number.
#[allow(clippy::too_many_arguments)]
fn push_msg(
    buf: &mut Vec<u8>,
    msg: &mut Vec<u8>,
    target: &[u8],
    stream: u32,
    seq: u64,
    intended_ns: u64,
    size: usize,
    v2: bool,
) {
    msg.clear();
    payload::encode(
        msg,
        Stamp {
            stream,
            seq,
            intended_ns,
        },
        size,
    );
    if v2 {
        v2::push_send(buf, seq, target, msg);
    } else {
        ClientFrame::Send { target, msg }.encode(buf);
    }
}

/// The receiver of one pair: acks everything, tracks sequence numbers, records latency.
async fn receive(env: WorkerEnv, mut c: Client, pair: Rc<Pair>, t: Timing) {
    let mut acks = Vec::with_capacity(64 << 10);
    let counters = &env.me().c;
    loop {
        let now = clock::now_ns();
        loop {
            let frame = match c.rx.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    env.me().error(&format!("receiver: bad server frame: {e}"));
                    return;
                }
            };
            match frame {
                ServerFrame::Reliable { id, payload } => {
                    conn::push_ack(&mut acks, id);
                    arrive(&env, &pair, t, now, payload);
                }
                ServerFrame::Error { reason } => {
                    env.me().error(&format!(
                        "receiver got ERROR {}",
                        String::from_utf8_lossy(reason)
                    ));
                }
                ServerFrame::RateLimited { .. } => stats::add(&counters.rate_limited, 1),
                _ => stats::add(&counters.unexpected, 1),
            }
        }
        if !acks.is_empty() {
            if let Err(e) = c.write_all(&acks).await {
                count_error(&env, &e);
                return;
            }
            acks.clear();
        }
        if env.stopping() {
            return;
        }
        match c.fill().await {
            Ok(_) => {}
            Err(LoadError::Closed) if env.stopping() => return,
            Err(e) => {
                count_error(&env, &e);
                return;
            }
        }
    }
}

/// Protocol v2: the start times of the SENDs not acknowledged yet, by `client_msg_id` (the
/// sequence number), oldest first.
#[derive(Debug, Default)]
struct Unacked {
    /// `client_msg_id` of `times[0]`.
    base: u64,
    /// Start time of each SEND (`ACKED` once answered).
    times: VecDeque<u64>,
}

const ACKED: u64 = u64::MAX;

impl Unacked {
    fn push(&mut self, start_ns: u64) {
        self.times.push_back(start_ns);
    }

    /// The start time of SEND `id`, if it was waiting; it is no longer.
    fn take(&mut self, id: u64) -> Option<u64> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        let slot = self.times.get_mut(i)?;
        let t = std::mem::replace(slot, ACKED);
        while self.times.front() == Some(&ACKED) {
            self.times.pop_front();
            self.base += 1;
        }
        (t != ACKED).then_some(t)
    }
}

/// What a v2 sender waits for.
enum Wake {
    /// The time of the next message, or a window permit (closed loop).
    Due,
    /// Nothing yet (closed loop: no permit within [`conn::POLL`]).
    Tick,
    /// Bytes from the server (or not, on a read timeout tick).
    Read(Result<Option<usize>, LoadError>),
}

/// The sender of one pair, protocol v2: [`send`]'s schedule, SEND frames, and the server's
/// SEND_ACKs and PINGs read whenever the sender waits.
async fn send_v2(
    env: WorkerEnv,
    mut c: Client,
    pair: Rc<Pair>,
    target: Vec<u8>,
    o: PairsOpts,
    t: Timing,
    phase: f64,
) {
    let per_pair = o.rate.map(|r| r / o.pairs as f64);
    let interval = per_pair.map(|r| 1e9 / r.max(1e-9)).unwrap_or(0.0);
    let first = t.start_ns + (phase * interval) as u64;
    let intended = |k: u64| first + (k as f64 * interval) as u64;
    let max_batch = o.max_batch.max(1);
    let size = o.size.max(payload::MIN_SIZE);
    let mut buf = Vec::with_capacity(max_batch * v2::send_len(target.len(), size));
    let mut msg = Vec::with_capacity(size);
    let mut out = Vec::new();
    let mut unacked = Unacked::default();
    let mut k = 0u64;
    let counters = &env.me().c;
    loop {
        if env.stopping() {
            break;
        }
        if let Err(e) = sender_frames_v2(&env, &mut c, &pair, t, &mut unacked, &mut out).await {
            count_error(&env, &e);
            break;
        }
        let now = clock::now_ns();
        let n = match &pair.window {
            None => {
                let next = intended(k);
                if next >= t.end_ns {
                    break;
                }
                if next > now {
                    let wake = futures_lite::future::or(
                        async {
                            clock::sleep_until_ns(next).await;
                            Wake::Due
                        },
                        async { Wake::Read(c.fill().await) },
                    )
                    .await;
                    if let Wake::Read(Err(e)) = wake {
                        count_error(&env, &e);
                        break;
                    }
                    continue;
                }
                buf.clear();
                push_due(&env, t, now, k, max_batch, intended, |seq, due| {
                    push_msg(&mut buf, &mut msg, &target, pair.id, seq, due, o.size, true);
                    unacked.push(due);
                })
            }
            Some(win) => {
                if now >= t.end_ns {
                    break;
                }
                let wake = futures_lite::future::or(
                    async {
                        match glommio::timer::timeout(conn::POLL, win.acquire(1)).await {
                            Ok(()) => Wake::Due,
                            Err(_) => Wake::Tick,
                        }
                    },
                    async { Wake::Read(c.fill().await) },
                )
                .await;
                match wake {
                    Wake::Due => {}
                    Wake::Tick | Wake::Read(Ok(_)) => continue,
                    Wake::Read(Err(e)) => {
                        count_error(&env, &e);
                        break;
                    }
                }
                let extra = win.available().min(max_batch as u64 - 1);
                let extra = if extra > 0 && !win.try_acquire(extra).unwrap_or(false) {
                    0
                } else {
                    extra
                };
                let n = 1 + extra as usize;
                let now = clock::now_ns();
                buf.clear();
                for j in 0..n {
                    let seq = k + j as u64;
                    push_msg(&mut buf, &mut msg, &target, pair.id, seq, now, o.size, true);
                    unacked.push(now);
                }
                n
            }
        };
        match c.write_all(&buf).await {
            Ok(()) => {
                k += n as u64;
                pair.sent.set(k);
                stats::add(&counters.sent, n as u64);
            }
            Err(e) => {
                count_error(&env, &e);
                break;
            }
        }
        glommio::yield_if_needed().await;
    }
    stats::add(&counters.finished, 1);
    // Keep the connection until the end, reading the last SEND_ACKs.
    while !env.stopping() {
        if let Err(e) = sender_frames_v2(&env, &mut c, &pair, t, &mut unacked, &mut out).await {
            count_error(&env, &e);
            break;
        }
        if let Err(e) = c.fill().await {
            count_error(&env, &e);
            break;
        }
    }
}

/// Handles the frames a v2 sender has received: SEND_ACK (counted, latency recorded), PING
/// (answered), refusals of SENDs (counted; in closed loop their window slot is given back).
async fn sender_frames_v2(
    env: &WorkerEnv,
    c: &mut Client,
    pair: &Pair,
    t: Timing,
    unacked: &mut Unacked,
    out: &mut Vec<u8>,
) -> Result<(), LoadError> {
    use iris_wire::v2::{LimitedAction, ServerFrame as S};
    let counters = &env.me().c;
    let now = clock::now_ns();
    let mut refused = 0u64;
    while let Some(f) = c.rx.next_v2()? {
        match f {
            v2::In::SendAck { client_msg_id, .. } => {
                stats::add(&counters.send_acks, 1);
                match unacked.take(client_msg_id) {
                    Some(start) if start >= t.measure_ns && start < t.end_ns => {
                        env.send_ack.record(now.saturating_sub(start));
                    }
                    Some(_) => {}
                    None => stats::add(&counters.unexpected, 1),
                }
            }
            v2::In::Other(S::Ping { nonce }) => v2::push_pong(out, nonce),
            v2::In::Other(S::RateLimited {
                what, reference, ..
            }) => {
                stats::add(&counters.rate_limited, 1);
                if what == LimitedAction::Send && unacked.take(reference).is_some() {
                    refused += 1;
                }
            }
            v2::In::Other(S::Error {
                reason, reference, ..
            }) => {
                env.me().error(&format!("sender got ERROR {reason}"));
                if reference != 0 && unacked.take(reference).is_some() {
                    refused += 1;
                }
            }
            _ => stats::add(&counters.unexpected, 1),
        }
    }
    if let (Some(w), true) = (&pair.window, refused > 0) {
        w.signal(refused);
    }
    if !out.is_empty() {
        c.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The receiver of one pair, protocol v2: one ACK frame per read with every id of the read.
async fn receive_v2(env: WorkerEnv, mut c: Client, pair: Rc<Pair>, t: Timing) {
    use iris_wire::v2::ServerFrame as S;
    let mut out = Vec::with_capacity(64 << 10);
    let mut ids: Vec<u64> = Vec::with_capacity(4096);
    let counters = &env.me().c;
    loop {
        let now = clock::now_ns();
        loop {
            let frame = match c.rx.next_v2() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    env.me().error(&format!("receiver: bad server frame: {e}"));
                    return;
                }
            };
            match frame {
                v2::In::Deliver {
                    server_id, payload, ..
                } => {
                    ids.push(server_id);
                    arrive(&env, &pair, t, now, payload);
                }
                v2::In::Other(S::Ping { nonce }) => v2::push_pong(&mut out, nonce),
                v2::In::Other(S::Error { reason, .. }) => {
                    env.me().error(&format!("receiver got ERROR {reason}"));
                }
                v2::In::Other(S::RateLimited { .. }) => stats::add(&counters.rate_limited, 1),
                _ => stats::add(&counters.unexpected, 1),
            }
        }
        v2::push_acks(&mut out, &ids);
        ids.clear();
        if !out.is_empty() {
            if let Err(e) = c.write_all(&out).await {
                count_error(&env, &e);
                return;
            }
            out.clear();
        }
        if env.stopping() {
            return;
        }
        match c.fill().await {
            Ok(_) => {}
            Err(LoadError::Closed) if env.stopping() => return,
            Err(e) => {
                count_error(&env, &e);
                return;
            }
        }
    }
}

/// One message received by a receiver (v1 or v2): sequence tracking, latency, window.
#[inline]
fn arrive(env: &WorkerEnv, pair: &Pair, t: Timing, now: u64, body: &[u8]) {
    let counters = &env.me().c;
    let Some(s) = payload::decode(body).filter(|s| s.stream == pair.id) else {
        stats::add(&counters.unexpected, 1);
        return;
    };
    match pair.tracker.borrow_mut().record(s.seq) {
        Arrival::Duplicate => {
            stats::add(&counters.duplicates, 1);
            return;
        }
        Arrival::Reordered => stats::add(&counters.reordered, 1),
        Arrival::InOrder => {}
    }
    stats::add(&counters.delivered, 1);
    if s.intended_ns >= t.measure_ns && s.intended_ns < t.end_ns {
        env.hist.record(now.saturating_sub(s.intended_ns));
    }
    if let Some(w) = &pair.window {
        w.signal(1);
    }
}

/// Runs `pairs`.
pub fn run(o: &PairsOpts, command: Vec<String>) -> anyhow::Result<Report> {
    anyhow::ensure!(
        o.rate.is_some() || o.max,
        "give --rate MSGS_PER_S (open loop) or --max (saturation)"
    );
    anyhow::ensure!(o.pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(
        o.rate.is_none_or(|r| r > 0.0 && r.is_finite()),
        "--rate must be positive"
    );
    let mut run = Run::new(&o.common, "pairs", command, o)?;
    let mem0 = run.server_now();
    let oc = o.clone();
    let handles = run.spawn(move |env| worker(env, oc.clone()))?;
    run.shared.set_phase(SETUP, clock::now_ns());
    let setup_budget = 60.0 + o.idle as f64 / o.idle_rate.max(1.0) * 3.0;
    run.wait_ready("connection setup", setup_budget)?;
    let conns = run.shared.totals().connections;
    run.monitor.say(&format!(
        "{conns} connections logged in ({} pairs, {} idle); starting",
        o.pairs, o.idle
    ));
    let start = clock::now_ns() + 20_000_000;
    let w = run.measure_window(RUN, start, o.warmup, o.duration)?;
    let (t0, t1, s0, s1, window, end) = (
        w.before,
        w.after,
        w.server_before,
        w.server_after,
        w.secs,
        w.end,
    );
    let drain_deadline = end + clock::secs_to_ns(o.drain_timeout);
    let pairs = o.pairs as u64;
    // v2: the drain also waits for every SEND_ACK (they may trail the deliveries).
    let v2 = o.common.protocol == Protocol::V2;
    let drained = run.monitor.wait_until(
        |s| {
            let t = s.totals();
            t.finished >= pairs && t.delivered >= t.sent && (!v2 || t.send_acks >= t.sent)
        },
        Some(drain_deadline),
    )?;
    let outcomes = run.stop_and_join(handles)?;
    let send_acks = run.shared.totals().send_acks;
    let mut sum = Outcome::default();
    for x in outcomes {
        sum.sent += x.sent;
        sum.distinct += x.distinct;
        sum.lost += x.lost;
        sum.duplicates += x.duplicates;
        sum.reordered += x.reordered;
        sum.phantom += x.phantom;
    }
    // Memory from before the connections, CPU from the measured window only.
    let before = mem0.map(|m| match s0 {
        Some(s) => ServerNow { mem: m.mem, ..s },
        None => m,
    });
    run.set_server(before, s1, window);
    let r = &mut run.report;
    r.lost = sum.lost;
    if let Some(rate) = o.rate {
        r.figure("offered_per_s", rate);
    }
    r.figure("pairs", o.pairs as f64);
    r.figure("idle_connections", o.idle as f64);
    r.figure("connections", conns as f64);
    r.figure("measured_secs", window);
    r.figure("sent_per_s", (t1.sent - t0.sent) as f64 / window);
    r.figure(
        "delivered_per_s",
        (t1.delivered - t0.delivered) as f64 / window,
    );
    let delivered_in_window = (t1.delivered - t0.delivered) as f64;
    if let Some(sv) = r.server.clone().filter(|_| delivered_in_window > 0.0) {
        // Server CPU per delivered (and acked) message, in all and per thread.
        r.figure(
            "server_cpu_us_per_msg",
            sv.cpu_secs * 1e6 / delivered_in_window,
        );
        let per_thread: Vec<(String, f64)> = sv
            .threads
            .iter()
            .filter(|t| t.cpu_secs > 0.0)
            .map(|t| (t.name.clone(), t.cpu_secs * 1e6 / delivered_in_window))
            .collect();
        for (name, us) in per_thread {
            r.figure(&format!("server_cpu_us_per_msg_{name}"), us);
        }
    }
    r.figure("sent", sum.sent as f64);
    r.figure("delivered", sum.distinct as f64);
    r.figure("lost", sum.lost as f64);
    r.figure("duplicated", sum.duplicates as f64);
    r.figure("reordered", sum.reordered as f64);
    if o.common.protocol == Protocol::V2 {
        r.figure("send_acks", send_acks as f64);
        r.figure(
            "send_acks_per_s",
            (t1.send_acks - t0.send_acks) as f64 / window,
        );
    }
    if sum.phantom > 0 {
        r.notes.push(format!(
            "{} sequence numbers received that were never sent",
            sum.phantom
        ));
    }
    r.figure("drain_complete", if drained { 1.0 } else { 0.0 });
    if !drained {
        r.notes.push(format!(
            "not every message arrived within --drain-timeout {} s: `lost` counts messages \
             still undelivered then (an overloaded server may still hold them)",
            o.drain_timeout
        ));
    }
    let what = if o.max {
        "end to end, from the actual send (closed loop)"
    } else {
        "end to end, from the intended send time (open loop)"
    };
    Ok(run.finish(what))
}
