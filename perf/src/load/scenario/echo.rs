//! `echo`: the client of the reference echo server ([`crate::load::echo`]).
//!
//! `--conns` connections each write `--batch` messages of `--size` bytes in one write, wait
//! until all of them came back, and repeat (closed loop). With `--batch 1` the server reads one
//! message per read (the round-trip ceiling); with `--batch 8` it reads 8 (the batching
//! ceiling). `messages_per_s` counts echoed messages in the measured window, `round_trips_per_s`
//! completed batches; the latency is the round trip of a batch.

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use super::super::cli::Common;
use super::super::clock;
use super::super::conn::{Client, LoadError};
use super::super::report::Report;
use super::super::runtime::WorkerEnv;
use super::super::stats;
use super::{count_error, Run};

/// Options of `echo`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct EchoOpts {
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Messages per write (and per server read).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds before the measurement.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

const SETUP: u32 = 1;
const RUN: u32 = 2;

async fn one_conn(env: WorkerEnv, mut c: Client, o: EchoOpts, measure: u64, end: u64) {
    let batch = o.batch.max(1);
    let out = vec![0x5a_u8; batch * o.size.max(1)];
    let counters = &env.me().c;
    'run: while clock::now_ns() < end && !env.stopping() {
        let t0 = clock::now_ns();
        if let Err(e) = c.write_all(&out).await {
            count_error(&env, &e);
            break;
        }
        stats::add(&counters.sent, batch as u64);
        let mut got = 0;
        while got < out.len() {
            match c.fill().await {
                Ok(_) => {
                    let n = c.rx.data().len().min(out.len() - got);
                    c.rx.consume(n);
                    got += n;
                }
                Err(LoadError::Closed) if env.stopping() => break 'run,
                Err(e) => {
                    count_error(&env, &e);
                    break 'run;
                }
            }
            if env.stopping() {
                break 'run;
            }
        }
        let now = clock::now_ns();
        if t0 >= measure && now < end {
            env.hist.record(now - t0);
        }
        stats::add(&counters.delivered, batch as u64);
        stats::add(&counters.logins, 1);
        glommio::yield_if_needed().await;
    }
    stats::add(&counters.finished, 1);
}

async fn worker(env: WorkerEnv, o: EchoOpts) -> anyhow::Result<()> {
    if env.wait_phase(SETUP).await.is_err() {
        return Ok(());
    }
    let mut conns = Vec::new();
    for i in env.my_share(o.conns) {
        let c = Client::connect(env.target(i), env.connect_timeout, env.shared.clone())
            .await
            .with_context(|| format!("echo connection {i}"))?;
        stats::add(&env.me().c.connections, 1);
        conns.push(c);
    }
    env.set_ready();
    let Ok(start) = env.wait_phase(RUN).await else {
        return Ok(());
    };
    let measure = start + clock::secs_to_ns(o.warmup);
    let end = measure + clock::secs_to_ns(o.duration);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| glommio::spawn_local(one_conn(env.clone(), c, o.clone(), measure, end)))
        .collect();
    for t in tasks {
        t.await;
    }
    Ok(())
}

/// Runs `echo`.
pub fn run(o: &EchoOpts, command: Vec<String>) -> anyhow::Result<Report> {
    anyhow::ensure!(
        o.common.protocol == super::super::conn::Protocol::V1,
        "echo speaks the echo server's raw protocol: --protocol v2 does not apply"
    );
    anyhow::ensure!(
        o.conns > 0 && o.batch > 0,
        "--conns and --batch must be > 0"
    );
    let mut run = Run::new(&o.common, "echo", command, o)?;
    let oc = o.clone();
    let handles = run.spawn(move |env| worker(env, oc.clone()))?;
    run.shared.set_phase(SETUP, clock::now_ns());
    run.wait_ready("connect", 60.0)?;
    let start = clock::now_ns() + 10_000_000;
    let w = run.measure_window(RUN, start, o.warmup, o.duration)?;
    let (t0, t1, s0, s1, window, end) = (
        w.before,
        w.after,
        w.server_before,
        w.server_after,
        w.secs,
        w.end,
    );
    let conns = o.conns as u64;
    run.monitor
        .wait_until(|s| s.totals().finished >= conns, Some(end + 10_000_000_000))?;
    run.stop_and_join(handles)?;
    run.set_server(s0, s1, window);
    let r = &mut run.report;
    r.figure("conns", o.conns as f64);
    r.figure("batch", o.batch as f64);
    r.figure("measured_secs", window);
    r.figure(
        "messages_per_s",
        (t1.delivered - t0.delivered) as f64 / window,
    );
    r.figure("round_trips_per_s", (t1.logins - t0.logins) as f64 / window);
    Ok(run.finish("round trip of one batch"))
}
