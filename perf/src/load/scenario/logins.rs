//! `logins`: login/logout churn.
//!
//! `--conns` loops run at once (closed loop). By default each login is a full session: TCP
//! connect, LOGIN, wait for LOGIN_OK, close (the logout). With `--relogin` each loop keeps one
//! socket and sends LOGIN after LOGIN_OK again and again (the protocol allows a second LOGIN on
//! a socket), which measures the server's login path without the kernel's TCP handshake. Loop
//! `j` cycles through users `j, j + conns, …` of a pool of `--users` names. `logins_per_s`
//! counts LOGIN_OKs in the measured window; the latency is from the start of each login
//! (connect included by default) to its LOGIN_OK. With `--protocol v2` a login is HELLO →
//! HELLO_OK (no `--relogin`: v2 allows one HELLO per connection). With `--jwt-secret` every
//! loop signs its users' tokens first (in the warm-up), so the measured churn costs the load
//! generator no signing, only the edge its check of each token.

use clap::Args;
use serde::Serialize;

use super::super::cli::Common;
use super::super::clock;
use super::super::conn::{Client, Protocol};
use super::super::report::Report;
use super::super::runtime::WorkerEnv;
use super::super::stats;
use super::{count_error, Run};

/// Options of `logins`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LoginsOpts {
    #[command(flatten)]
    pub common: Common,
    /// Login loops running at once.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Size of the pool of user names.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Re-login on one socket instead of connect/login/close.
    #[arg(long)]
    pub relogin: bool,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of churn before the measurement.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

const RUN: u32 = 1;

async fn one_loop(env: WorkerEnv, o: LoginsOpts, j: usize, measure: u64, end: u64) {
    let pool = o.users.max(1);
    // With `--jwt-secret`, each user's token is signed here, before the churn starts.
    let users: Vec<Vec<u8>> = (j % pool..pool)
        .step_by(o.conns.max(1))
        .map(|u| {
            env.shared
                .login_body(format!("{}lg{u}", env.prefix).as_bytes())
        })
        .collect();
    let addr = env.target(j);
    let counters = &env.me().c;
    let mut held: Option<Client> = None;
    let mut n = 0usize;
    while clock::now_ns() < end && !env.stopping() {
        let user = &users[n % users.len()];
        n += 1;
        let t0 = clock::now_ns();
        let r = match held.take() {
            Some(mut c) => c.login_with(user).await.map(|()| c),
            None => match Client::connect(addr, env.connect_timeout, env.shared.clone()).await {
                Ok(mut c) => c.login_with(user).await.map(|()| c),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(c) => {
                let now = clock::now_ns();
                if t0 >= measure && now < end {
                    env.hist.record(now - t0);
                }
                stats::add(&counters.logins, 1);
                if o.relogin {
                    held = Some(c);
                }
                // Otherwise dropping `c` closes the socket: the logout.
            }
            Err(e) => {
                count_error(&env, &e);
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    stats::add(&counters.finished, 1);
}

async fn worker(env: WorkerEnv, o: LoginsOpts) -> anyhow::Result<()> {
    let Ok(start) = env.wait_phase(RUN).await else {
        return Ok(());
    };
    let measure = start + clock::secs_to_ns(o.warmup);
    let end = measure + clock::secs_to_ns(o.duration);
    let tasks: Vec<_> = env
        .my_share(o.conns)
        .map(|j| glommio::spawn_local(one_loop(env.clone(), o.clone(), j, measure, end)))
        .collect();
    for t in tasks {
        t.await;
    }
    Ok(())
}

/// Runs `logins`.
pub fn run(o: &LoginsOpts, command: Vec<String>) -> anyhow::Result<Report> {
    anyhow::ensure!(o.conns > 0, "--conns must be > 0");
    anyhow::ensure!(
        !(o.relogin && o.common.protocol == Protocol::V2),
        "--relogin needs --protocol v1 (a second HELLO on a v2 connection is an error)"
    );
    let mut run = Run::new(&o.common, "logins", command, o)?;
    let oc = o.clone();
    let handles = run.spawn(move |env| worker(env, oc.clone()))?;
    let start = clock::now_ns() + 20_000_000;
    let w = run.measure_window(RUN, start, o.warmup, o.duration)?;
    let (l0, l1, s0, s1, window, end) = (
        w.before.logins,
        w.after.logins,
        w.server_before,
        w.server_after,
        w.secs,
        w.end,
    );
    let loops = o.conns as u64;
    run.monitor
        .wait_until(|s| s.totals().finished >= loops, Some(end + 15_000_000_000))?;
    run.stop_and_join(handles)?;
    run.set_server(s0, s1, window);
    let r = &mut run.report;
    r.figure("concurrency", o.conns as f64);
    r.figure("measured_secs", window);
    r.figure("logins_per_s", (l1 - l0) as f64 / window);
    let what = if o.relogin {
        "LOGIN to LOGIN_OK on an open socket"
    } else {
        "TCP connect + LOGIN to LOGIN_OK"
    };
    Ok(run.finish(what))
}
