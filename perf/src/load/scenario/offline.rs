//! `offline`: fill N offline users' inboxes, then time the drain when they all log in.
//!
//! Phases: the `--senders` sender connections log in; **fill**: they send `--messages`
//! messages, spread evenly over the `--users` receivers (who have never logged in), as fast as
//! the server reads them (receiver `r` is served by sender `r % senders`, one sequence number
//! stream per receiver); after `--settle` seconds the receivers connect (TCP only); **drain**:
//! every receiver sends LOGIN at the same instant, then acks everything it gets until it has
//! all its messages. `drain_per_s` = messages received / (last arrival − LOGIN time). The
//! latency histogram holds, for every message, the time from its receiver's LOGIN to its
//! arrival. Loss, duplicates and order are checked per receiver.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Context as _;
use clap::Args;
use iris_edge::protocol::frame::ServerFrame;
use iris_edge::protocol::ClientFrame;
use serde::Serialize;

use super::super::cli::Common;
use super::super::clock;
use super::super::conn::{self, Client};
use super::super::payload::{self, Stamp};
use super::super::report::Report;
use super::super::runtime::WorkerEnv;
use super::super::seq::{Arrival, SeqTracker};
use super::super::stats;
use super::{connect_login, count_error, Run};

/// Options of `offline`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct OfflineOpts {
    #[command(flatten)]
    pub common: Common,
    /// Offline users whose inboxes are filled.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Messages in all, spread evenly over the users.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Sender connections.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Payload bytes per message (at least 22).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds between the end of the fill and the logins.
    #[arg(long, default_value_t = 0.5)]
    pub settle: f64,
    /// Seconds allowed for the fill and for the drain, each.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Most messages in one write of a sender.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
}

const SETUP: u32 = 1;
const FILL: u32 = 2;
const CONNECT: u32 = 3;
const DRAIN: u32 = 4;

/// Messages receiver `r` gets.
fn quota(o: &OfflineOpts, r: usize) -> u64 {
    let u = o.users as u64;
    o.messages / u + u64::from((r as u64) < o.messages % u)
}

#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    expected: u64,
    distinct: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    /// Slowest receiver's time from LOGIN to its last message, ns.
    slowest_ns: u64,
}

async fn worker(env: WorkerEnv, o: OfflineOpts) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    if env.wait_phase(SETUP).await.is_err() {
        return Ok(out);
    }
    let mut senders = Vec::new();
    for s in env.my_share(o.senders) {
        let user = format!("{}os{s}", env.prefix);
        let c = connect_login(&env, env.target(s), user.as_bytes())
            .await
            .with_context(|| format!("sender {user}"))?;
        stats::add(&env.me().c.connections, 1);
        senders.push((s, c));
    }
    env.set_ready();
    if env.wait_phase(FILL).await.is_err() {
        return Ok(out);
    }
    let mut tasks = Vec::new();
    for (s, c) in senders {
        tasks.push(glommio::spawn_local(fill(env.clone(), c, s, o.clone())));
    }
    for t in tasks {
        t.await;
    }
    env.set_ready();
    if env.wait_phase(CONNECT).await.is_err() {
        return Ok(out);
    }
    let mut receivers = Vec::new();
    for r in env.my_share(o.users) {
        let c = Client::connect(env.target(r), env.connect_timeout, env.shared.clone())
            .await
            .with_context(|| format!("receiver {r}"))?;
        receivers.push((r, c));
    }
    env.set_ready();
    let Ok(start) = env.wait_phase(DRAIN).await else {
        return Ok(out);
    };
    let results = Rc::new(RefCell::new(Vec::new()));
    let mut tasks = Vec::new();
    for (r, c) in receivers {
        let q = quota(&o, r);
        tasks.push(glommio::spawn_local(drain(
            env.clone(),
            c,
            r,
            q,
            start,
            results.clone(),
        )));
    }
    for t in tasks {
        t.await;
    }
    for (q, tr, done_ns) in results.borrow().iter() {
        out.expected += q;
        out.distinct += tr.distinct;
        out.lost += tr.lost(*q);
        out.duplicates += tr.duplicates;
        out.reordered += tr.reordered;
        out.slowest_ns = out.slowest_ns.max(*done_ns);
    }
    Ok(out)
}

/// One sender: its receivers' quotas, round-robin, as fast as the socket takes them.
async fn fill(env: WorkerEnv, mut c: Client, s: usize, o: OfflineOpts) {
    let mine: Vec<(u32, Vec<u8>, u64)> = (s..o.users)
        .step_by(o.senders)
        .map(|r| {
            (
                r as u32,
                format!("{}or{r}", env.prefix).into_bytes(),
                quota(&o, r),
            )
        })
        .collect();
    let mut next = vec![0u64; mine.len()];
    let mut buf = Vec::new();
    let mut msg = Vec::new();
    let counters = &env.me().c;
    let mut left: u64 = mine.iter().map(|m| m.2).sum();
    let mut turn = 0usize;
    while left > 0 && !env.stopping() {
        buf.clear();
        let mut n = 0u64;
        let now = clock::now_ns();
        while n < o.max_batch.max(1) as u64 && left > 0 {
            let i = turn % mine.len();
            turn += 1;
            let (stream, target, q) = &mine[i];
            if next[i] >= *q {
                continue;
            }
            msg.clear();
            payload::encode(
                &mut msg,
                Stamp {
                    stream: *stream,
                    seq: next[i],
                    intended_ns: now,
                },
                o.size,
            );
            ClientFrame::Send { target, msg: &msg }.encode(&mut buf);
            next[i] += 1;
            left -= 1;
            n += 1;
        }
        if let Err(e) = c.write_all(&buf).await {
            count_error(&env, &e);
            break;
        }
        stats::add(&counters.sent, n);
        glommio::yield_if_needed().await;
    }
    counters
        .last_event_ns
        .fetch_max(clock::now_ns(), std::sync::atomic::Ordering::Relaxed);
    stats::add(&counters.finished, 1);
}

/// One receiver: LOGIN at `start`, then ack and check everything; it counts as finished once
/// its quota is in, and keeps its session (still acking and checking) until the run stops.
async fn drain(
    env: WorkerEnv,
    mut c: Client,
    r: usize,
    quota: u64,
    start: u64,
    results: Rc<RefCell<Vec<(u64, SeqTracker, u64)>>>,
) {
    let user = format!("{}or{r}", env.prefix);
    let mut tr = SeqTracker::new();
    let mut done_ns = 0;
    let counters = &env.me().c;
    clock::sleep_until_ns(start).await;
    let login_at = clock::now_ns();
    if let Err(e) = c.login(user.as_bytes()).await {
        count_error(&env, &e);
        stats::add(&counters.finished, 1);
        results.borrow_mut().push((quota, tr, 0));
        return;
    }
    stats::add(&counters.connections, 1);
    stats::add(&counters.logins, 1);
    let mut acks = Vec::new();
    let mut finished = false;
    let mut bad = false;
    loop {
        let now = clock::now_ns();
        while !bad {
            let frame = match c.rx.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    env.me().error(&format!("receiver: bad server frame: {e}"));
                    bad = true;
                    break;
                }
            };
            match frame {
                ServerFrame::Reliable { id, payload } => {
                    conn::push_ack(&mut acks, id);
                    let Some(s) = payload::decode(payload).filter(|s| s.stream == r as u32) else {
                        stats::add(&counters.unexpected, 1);
                        continue;
                    };
                    match tr.record(s.seq) {
                        Arrival::Duplicate => {
                            stats::add(&counters.duplicates, 1);
                            continue;
                        }
                        Arrival::Reordered => stats::add(&counters.reordered, 1),
                        Arrival::InOrder => {}
                    }
                    stats::add(&counters.delivered, 1);
                    env.hist.record(now.saturating_sub(login_at));
                    done_ns = now - login_at;
                    counters
                        .last_event_ns
                        .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                }
                ServerFrame::Error { reason } => env.me().error(&format!(
                    "receiver got ERROR {}",
                    String::from_utf8_lossy(reason)
                )),
                ServerFrame::RateLimited { .. } => stats::add(&counters.rate_limited, 1),
                _ => stats::add(&counters.unexpected, 1),
            }
        }
        if !acks.is_empty() {
            if let Err(e) = c.write_all(&acks).await {
                count_error(&env, &e);
                break;
            }
            acks.clear();
        }
        if !finished && tr.distinct >= quota {
            finished = true;
            stats::add(&counters.finished, 1);
        }
        if bad || env.stopping() {
            break;
        }
        if let Err(e) = c.fill().await {
            count_error(&env, &e);
            break;
        }
    }
    if !finished {
        stats::add(&counters.finished, 1);
    }
    results.borrow_mut().push((quota, tr, done_ns));
}

/// Runs `offline`.
pub fn run(o: &OfflineOpts, command: Vec<String>) -> anyhow::Result<Report> {
    anyhow::ensure!(
        o.common.protocol == super::super::conn::Protocol::V1,
        "offline speaks protocol v1 only (--protocol v2 is not built for it)"
    );
    anyhow::ensure!(
        o.users > 0 && o.senders > 0,
        "--users and --senders must be > 0"
    );
    let mut run = Run::new(&o.common, "offline", command, o)?;
    let oc = o.clone();
    let handles = run.spawn(move |env| worker(env, oc.clone()))?;
    run.shared.set_phase(SETUP, clock::now_ns());
    run.wait_ready("sender login", 60.0)?;
    let fill_start = clock::now_ns() + 10_000_000;
    run.shared.set_phase(FILL, fill_start);
    run.wait_ready("fill", o.timeout)?;
    let fill_end = run.shared.last_event_ns().max(fill_start + 1);
    let fill_secs = (fill_end - fill_start) as f64 / 1e9;
    let sent = run.shared.totals().sent;
    run.monitor.say(&format!(
        "filled {sent} messages in {fill_secs:.3} s; settling {} s",
        o.settle
    ));
    run.monitor
        .sleep_until(clock::now_ns() + clock::secs_to_ns(o.settle))?;
    run.shared.set_phase(CONNECT, clock::now_ns());
    run.wait_ready("receiver connect", 60.0)?;
    let s0 = run.server_now();
    let drain_start = clock::now_ns() + 20_000_000;
    run.shared.set_phase(DRAIN, drain_start);
    let users = o.users as u64;
    let senders = o.senders as u64;
    let complete = run.monitor.wait_until(
        |s| s.totals().finished >= senders + users,
        Some(drain_start + clock::secs_to_ns(o.timeout)),
    )?;
    let drain_end = run.shared.last_event_ns().max(drain_start + 1);
    let s1 = run.server_now();
    let drain_secs = (drain_end - drain_start) as f64 / 1e9;
    let outs = run.stop_and_join(handles)?;
    let mut sum = Outcome::default();
    for x in outs {
        sum.expected += x.expected;
        sum.distinct += x.distinct;
        sum.lost += x.lost;
        sum.duplicates += x.duplicates;
        sum.reordered += x.reordered;
        sum.slowest_ns = sum.slowest_ns.max(x.slowest_ns);
    }
    run.set_server(s0, s1, drain_secs);
    let r = &mut run.report;
    r.lost = sum.lost;
    r.figure("users", o.users as f64);
    r.figure("messages", o.messages as f64);
    r.figure("sent", sent as f64);
    r.figure("fill_secs", fill_secs);
    r.figure("fill_per_s", sent as f64 / fill_secs);
    r.figure("delivered", sum.distinct as f64);
    r.figure("drain_secs", drain_secs);
    r.figure("drain_per_s", sum.distinct as f64 / drain_secs);
    r.figure("slowest_user_secs", sum.slowest_ns as f64 / 1e9);
    r.figure("lost", sum.lost as f64);
    r.figure("duplicated", sum.duplicates as f64);
    r.figure("reordered", sum.reordered as f64);
    if !complete {
        r.notes.push(format!(
            "the drain did not complete within --timeout {} s",
            o.timeout
        ));
    }
    Ok(run.finish("from the receiver's LOGIN to each stored message's arrival"))
}
