//! `connect`: open N logged-in connections at a set rate and hold them idle.
//!
//! Figures: `connects_per_s` (logged-in connections / ramp time), `connections_open`,
//! `still_open` (connections the server had not closed at the end of the hold) and, with
//! `--server-pid`, `server_rss_per_conn_bytes` and `server_anon_per_conn_bytes`: the growth of
//! the server's resident (and anonymous resident) memory from before the ramp to `--settle`
//! seconds after it, divided by the connections open, and `server_idle_cpu_cores`: the server's
//! CPU (in cores) from that sample to the end of the hold, while it only holds the idle
//! connections (`--hold` must exceed `--settle` by 0.5 s or more). The latency is connect + login, from
//! each connection's intended start time.

use clap::Args;
use serde::Serialize;

use super::super::cli::Common;
use super::super::clock;
use super::super::conn;
use super::super::report::Report;
use super::super::runtime::WorkerEnv;
use super::{ramp, Run};

/// Options of `connect`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ConnectOpts {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Ramp rate in connections/s (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Connects in progress at once, per worker.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold the connections after the ramp.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Seconds after the ramp before the server's memory is sampled.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
}

const RAMP: u32 = 1;
const CHECK: u32 = 2;

async fn worker(env: WorkerEnv, o: ConnectOpts) -> anyhow::Result<u64> {
    let Ok(start) = env.wait_phase(RAMP).await else {
        return Ok(0);
    };
    let mine: Vec<usize> = env.my_share(o.conns).collect();
    let rate = o.rate / env.workers as f64;
    let clients = ramp(&env, mine, "c", rate, start, o.concurrency, true).await;
    env.me()
        .c
        .last_event_ns
        .store(clock::now_ns(), std::sync::atomic::Ordering::Relaxed);
    env.set_ready();
    if env.wait_phase(CHECK).await.is_err() {
        return Ok(0);
    }
    let alive = clients.iter().filter(|c| conn::is_open(c)).count() as u64;
    env.set_ready();
    while !env.stopping() {
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(alive)
}

/// Runs `connect`.
pub fn run(o: &ConnectOpts, command: Vec<String>) -> anyhow::Result<Report> {
    let mut run = Run::new(&o.common, "connect", command, o)?;
    let mem0 = run.server_now();
    let mem0_ns = clock::now_ns();
    let oc = o.clone();
    let handles = run.spawn(move |env| worker(env, oc.clone()))?;
    let start = clock::now_ns() + 50_000_000;
    run.shared.set_phase(RAMP, start);
    let ramp_budget = if o.rate > 0.0 {
        o.conns as f64 / o.rate * 3.0 + 60.0
    } else {
        300.0
    };
    run.wait_ready("ramp", ramp_budget)?;
    let ramp_end = run.shared.last_event_ns().max(start + 1);
    let open = run.shared.totals().connections;
    let ramp_secs = (ramp_end - start) as f64 / 1e9;
    run.monitor.say(&format!(
        "{open} connections open after {ramp_secs:.2} s; holding"
    ));
    run.monitor
        .sleep_until(ramp_end + clock::secs_to_ns(o.settle))?;
    let mem1 = run.server_now();
    let mem1_ns = clock::now_ns();
    let sample_secs = (mem1_ns - mem0_ns) as f64 / 1e9;
    run.monitor
        .sleep_until(ramp_end + clock::secs_to_ns(o.hold.max(o.settle)))?;
    // The server's CPU while it only holds the idle connections: from the memory sample to the
    // end of the hold (a window under 0.5 s says nothing at /proc's 100 Hz).
    let idle_secs = (clock::now_ns() - mem1_ns) as f64 / 1e9;
    let idle_cpu = match (mem1.as_ref(), run.server_now()) {
        (Some(a), Some(b)) if idle_secs >= 0.5 => {
            Some((b.cpu_secs - a.cpu_secs).max(0.0) / idle_secs)
        }
        _ => None,
    };
    run.shared.set_phase(CHECK, clock::now_ns());
    run.wait_ready("liveness check", 60.0)?;
    let alive: u64 = run.stop_and_join(handles)?.into_iter().sum();
    run.set_server(mem0, mem1, sample_secs);
    let r = &mut run.report;
    r.figure("connections_requested", o.conns as f64);
    r.figure("connections_open", open as f64);
    r.figure("still_open", alive as f64);
    r.figure("ramp_secs", ramp_secs);
    r.figure("connects_per_s", open as f64 / ramp_secs);
    if let Some(cores) = idle_cpu {
        r.figure("server_idle_cpu_cores", cores);
        r.figure("server_idle_secs", idle_secs);
    }
    if let (Some(s), true) = (&r.server, open > 0) {
        let per = |a: u64, b: u64| (a as f64 - b as f64) * 1024.0 / open as f64;
        r.figures.insert(
            "server_rss_per_conn_bytes".into(),
            per(s.mem_after.rss_kib, s.mem_before.rss_kib),
        );
        r.figures.insert(
            "server_anon_per_conn_bytes".into(),
            per(s.mem_after.rss_anon_kib, s.mem_before.rss_anon_kib),
        );
    }
    Ok(run.finish("connect + login, from the intended start"))
}
