//! The scenarios, and what they share: [`Run`] (workers, monitor, report) and [`ramp`] (open
//! and log in many connections at a set rate).
//!
//! Every scenario follows the same shape on the main thread: [`Run::new`] resolves the
//! options, the scenario spawns its workers with [`Run::spawn`], walks them through its phases
//! ([`super::stats::Shared::set_phase`]) while the [`super::monitor::Monitor`] prints progress,
//! then [`Run::finish`] fills the report.

pub mod connect;
pub mod echo;
pub mod logins;
pub mod offline;
pub mod pairs;

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use glommio::sync::Semaphore;
use glommio::ExecutorJoinHandle;
use serde::Serialize;

use super::cli::Common;
use super::clock;
use super::conn::{Client, LoadError};
use super::host::{self, HostInfo};
use super::monitor::Monitor;
use super::report::{Report, ServerSample, ThreadCpu};
use super::runtime::{self, WorkerEnv, WorkerSpec};
use super::stats::{self, LatencySummary, Shared};

/// One sample of the server process: memory now, CPU seconds so far (in all and per thread).
#[derive(Debug, Clone)]
pub struct ServerNow {
    pub mem: host::ProcMem,
    pub cpu_secs: f64,
    pub threads: Vec<(String, f64)>,
}

/// The measured window of a run: the counters and the server sampled at both ends.
#[derive(Debug, Clone)]
pub struct Window {
    /// When measuring started and ended (ns on the run clock).
    pub measure: u64,
    pub end: u64,
    pub before: stats::Totals,
    pub after: stats::Totals,
    pub server_before: Option<ServerNow>,
    pub server_after: Option<ServerNow>,
    /// Length of the window, seconds.
    pub secs: f64,
}

/// A run in progress, on the main thread.
#[derive(Debug)]
pub struct Run {
    pub spec: WorkerSpec,
    pub targets: Vec<SocketAddr>,
    pub prefix: String,
    pub shared: Arc<Shared>,
    pub monitor: Monitor,
    pub report: Report,
    pub server_pid: Option<u32>,
    connect_timeout: Duration,
    wall_start_ns: u64,
    self_cpu_start: f64,
}

impl Run {
    /// Resolves `common`, prepares the shared state and the report of `scenario`.
    pub fn new(
        common: &Common,
        scenario: &str,
        command: Vec<String>,
        config: &impl Serialize,
    ) -> anyhow::Result<Self> {
        clock::epoch();
        let targets = common.resolve_targets()?;
        let cpus = match &common.cpus {
            Some(s) => runtime::parse_cpus(s)?,
            None => runtime::allowed_cpus(),
        };
        let spec = WorkerSpec {
            cpus: cpus.clone(),
            pin: !common.no_pin,
            io_memory: common.io_memory,
            spin_us: common.spin_us,
        };
        if spec.pin {
            // The main thread only wakes to print; keep it off the server's cores.
            core_affinity::set_for_current(core_affinity::CoreId { id: cpus[0] });
        }
        runtime::raise_nofile();
        let prefix = common.user_prefix.clone().unwrap_or_else(default_prefix);
        let shared = Shared::with_transport(
            cpus.len(),
            common.protocol,
            common.connector()?,
            common.source_addrs()?,
            common.tokens(),
        );
        let mut report = Report::new(scenario, command);
        report.label = common.label.clone();
        report.started_utc = clock::utc_now_iso();
        report.host = HostInfo::read();
        report.targets = common.targets.clone();
        report.load_cpus = cpus;
        report.config = serde_json::to_value(config)?;
        let monitor = Monitor::new(shared.clone(), scenario, common.quiet);
        Ok(Self {
            spec,
            targets,
            prefix,
            shared,
            monitor,
            report,
            server_pid: common.server_pid,
            connect_timeout: Duration::from_secs_f64(common.connect_timeout.max(0.001)),
            wall_start_ns: clock::now_ns(),
            self_cpu_start: host::self_cpu_secs(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.spec.cpus.len()
    }

    /// Starts the workers, each running `f(env)`.
    pub fn spawn<T, F, Fut>(
        &self,
        f: F,
    ) -> anyhow::Result<Vec<ExecutorJoinHandle<anyhow::Result<T>>>>
    where
        F: Fn(WorkerEnv) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = anyhow::Result<T>> + 'static,
        T: Send + 'static,
    {
        runtime::spawn_workers(
            &self.spec,
            &self.shared,
            &self.targets,
            &self.prefix,
            self.connect_timeout,
            f,
        )
    }

    /// Waits until every worker is ready (or `timeout_s` passes: an error).
    pub fn wait_ready(&mut self, what: &str, timeout_s: f64) -> anyhow::Result<()> {
        let deadline = clock::now_ns() + clock::secs_to_ns(timeout_s);
        if !self.monitor.wait_until(|s| s.all_ready(), Some(deadline))? {
            self.shared.stop.store(true, Ordering::Release);
            anyhow::bail!("{what}: not done after {timeout_s} s");
        }
        self.shared.clear_ready();
        Ok(())
    }

    /// Tells the workers to stop and joins them.
    pub fn stop_and_join<T: Send + 'static>(
        &mut self,
        handles: Vec<ExecutorJoinHandle<anyhow::Result<T>>>,
    ) -> anyhow::Result<Vec<T>> {
        self.shared.stop.store(true, Ordering::Release);
        let r = runtime::join_workers(handles);
        self.monitor.collect();
        r
    }

    /// Enters the run phase `phase` at `start`, waits out `warmup_s`, then samples the counters
    /// and the server around a measured window of `duration_s` seconds.
    pub fn measure_window(
        &mut self,
        phase: u32,
        start: u64,
        warmup_s: f64,
        duration_s: f64,
    ) -> anyhow::Result<Window> {
        self.shared.set_phase(phase, start);
        let measure = start + clock::secs_to_ns(warmup_s);
        let end = measure + clock::secs_to_ns(duration_s);
        self.monitor.sleep_until(measure)?;
        let before = self.shared.totals();
        let server_before = self.server_now();
        self.monitor.sleep_until(end)?;
        let after = self.shared.totals();
        let server_after = self.server_now();
        let secs = (clock::now_ns() - measure) as f64 / 1e9;
        Ok(Window {
            measure,
            end,
            before,
            after,
            server_before,
            server_after,
            secs,
        })
    }

    /// Samples the server process (memory now, CPU seconds so far, in all and per thread).
    pub fn server_now(&self) -> Option<ServerNow> {
        let pid = self.server_pid?;
        Some(ServerNow {
            mem: host::proc_mem(pid)?,
            cpu_secs: host::proc_cpu_secs(pid)?,
            threads: host::proc_thread_cpu_secs(pid),
        })
    }

    /// Records a server sample from `before` and `after` around a window of `secs` seconds.
    pub fn set_server(&mut self, before: Option<ServerNow>, after: Option<ServerNow>, secs: f64) {
        if let (Some(pid), Some(b), Some(a)) = (self.server_pid, before, after) {
            // /proc CPU times tick at 100 Hz: a shorter window says nothing.
            let busy = |cpu: f64| if secs >= 0.5 { cpu / secs } else { 0.0 };
            let cpu = (a.cpu_secs - b.cpu_secs).max(0.0);
            let threads = a
                .threads
                .iter()
                .map(|(name, after)| {
                    let before = b
                        .threads
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0.0, |t| t.1);
                    let cpu = (after - before).max(0.0);
                    ThreadCpu {
                        name: name.clone(),
                        cpu_secs: cpu,
                        cores_busy: busy(cpu),
                    }
                })
                .collect();
            self.report.server = Some(ServerSample {
                pid,
                mem_before: b.mem,
                mem_after: a.mem,
                cpu_secs: cpu,
                cpu_cores_busy: busy(cpu),
                threads,
            });
        }
    }

    /// Completes the report: totals, latency of the whole run (`what` it measures), time
    /// series, host load, error notes.
    pub fn finish(mut self, latency_what: &str) -> Report {
        self.monitor.collect();
        self.monitor.tick();
        let r = &mut self.report;
        r.totals = self.shared.totals();
        let h = &self.monitor.cumulative;
        if !h.is_empty() {
            r.latency_what = latency_what.into();
            r.latency = Some(LatencySummary::of(h));
            r.latency_distribution = stats::distribution(h);
        }
        if !self.monitor.lag.is_empty() {
            r.sender_lag = Some(LatencySummary::of(&self.monitor.lag));
        }
        if !self.monitor.send_ack.is_empty() {
            r.send_ack_latency = Some(LatencySummary::of(&self.monitor.send_ack));
        }
        r.timeseries = std::mem::take(&mut self.monitor.ticks);
        r.wall_secs = (clock::now_ns() - self.wall_start_ns) as f64 / 1e9;
        r.loadgen_cores_busy = if r.wall_secs > 0.0 {
            (host::self_cpu_secs() - self.self_cpu_start) / r.wall_secs
        } else {
            0.0
        };
        r.host.finish();
        for (e, n) in self.shared.error_kinds() {
            r.notes.push(format!("error x{n}: {e}"));
        }
        std::mem::take(&mut self.report)
    }
}

/// A user-name prefix unique to this run (time and pid), so runs never see each other's
/// stored messages.
pub fn default_prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    format!("ld{t}x{}", std::process::id())
}

/// Counts a failed connection operation on this worker (a stop is not an error).
pub fn count_error(env: &WorkerEnv, e: &LoadError) {
    if !matches!(e, LoadError::Stopped) {
        env.me().error(&e.to_string());
    }
}

/// Connects to `addr` and logs in as `user`.
pub async fn connect_login(
    env: &WorkerEnv,
    addr: SocketAddr,
    user: &[u8],
) -> Result<Client, LoadError> {
    let mut c = Client::connect(addr, env.connect_timeout, env.shared.clone()).await?;
    c.login(user).await?;
    Ok(c)
}

/// Opens and logs in one connection per global index in `indexes` (user
/// `{prefix}{tag}{index}`, target round-robin by index), the k-th at `start_ns + k / rate`
/// (`rate` ≤ 0: all at once), with at most `concurrency` in progress. Successes count in
/// `connections` and `logins`; with `record`, the latency from the intended time to LOGIN_OK
/// goes into the histogram. Failures are counted and skipped.
pub async fn ramp(
    env: &WorkerEnv,
    indexes: Vec<usize>,
    tag: &str,
    rate: f64,
    start_ns: u64,
    concurrency: usize,
    record: bool,
) -> Vec<Client> {
    let out = Rc::new(RefCell::new(Vec::with_capacity(indexes.len())));
    let sem = Rc::new(Semaphore::new(concurrency.max(1) as u64));
    let mut tasks = Vec::new();
    let gap = if rate > 0.0 { 1e9 / rate } else { 0.0 };
    for (k, i) in indexes.into_iter().enumerate() {
        if env.stopping() {
            break;
        }
        let intended = start_ns + (k as f64 * gap) as u64;
        clock::sleep_until_ns(intended).await;
        let Ok(permit) = sem.acquire_static_permit(1).await else {
            break;
        };
        let env = env.clone();
        let out = out.clone();
        let user = format!("{}{tag}{i}", env.prefix);
        tasks.push(glommio::spawn_local(async move {
            let r = connect_login(&env, env.target(i), user.as_bytes()).await;
            drop(permit);
            match r {
                Ok(c) => {
                    if record {
                        env.hist.record(clock::now_ns().saturating_sub(intended));
                    }
                    stats::add(&env.me().c.connections, 1);
                    stats::add(&env.me().c.logins, 1);
                    out.borrow_mut().push(c);
                }
                Err(e) => count_error(&env, &e),
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    Rc::try_unwrap(out)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| std::mem::take(&mut *rc.borrow_mut()))
}
