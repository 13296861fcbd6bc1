//! The worker threads: one pinned glommio executor per chosen CPU.
//!
//! [`spawn_workers`] starts one executor per CPU of `--cpus` (pinned with
//! `Placement::Fixed`, or unbound with `--no-pin`), each with a small registered I/O memory
//! area (the host's locked-memory limit is shared by all of them), and runs the scenario's
//! worker future there with a [`WorkerEnv`]. A worker's failure is recorded in the shared
//! state so the main thread can stop the run and report it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use super::clock;
use super::stats::{LocalHist, Shared, WorkerShared, FLUSH_EVERY};

/// Parses a CPU list such as `1`, `0,2` or `0-3,6`.
pub fn parse_cpus(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
                if b < a {
                    bail!("bad CPU range {part}");
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().with_context(|| format!("bad CPU {part:?}"))?),
        }
    }
    out.dedup();
    if out.is_empty() {
        bail!("empty CPU list {s:?}");
    }
    Ok(out)
}

/// The CPUs this process may run on (its affinity mask): the edge's reading of it.
pub use iris_edge::server::allowed_cpus;

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write exactly one `rlimit` that we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
    }
    r.rlim_cur
}

/// How to start the workers.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub cpus: Vec<usize>,
    pub pin: bool,
    /// Bytes of registered I/O memory per executor.
    pub io_memory: usize,
    /// Busy-poll this long before parking an idle executor (0: park at once).
    pub spin_us: u64,
}

/// What a worker knows about the run and its place in it.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    /// This worker's index, `0..workers`.
    pub idx: usize,
    /// Number of workers.
    pub workers: usize,
    pub shared: Arc<Shared>,
    pub hist: LocalHist,
    /// Sender lag: how late messages were written after their intended send time.
    pub lag: LocalHist,
    /// Protocol v2: SEND → SEND_ACK latency (from the intended send time, as `hist`).
    pub send_ack: LocalHist,
    pub targets: Arc<Vec<SocketAddr>>,
    /// Prefix of every user name of this run.
    pub prefix: Arc<str>,
    pub connect_timeout: Duration,
}

/// The phase a worker waited for did not come: the run is stopping.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("run stopped")]
pub struct Stopped;

impl WorkerEnv {
    /// This worker's shared counters.
    pub fn me(&self) -> &WorkerShared {
        &self.shared.workers[self.idx]
    }

    /// The target address for the `i`-th connection (round-robin).
    pub fn target(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len()]
    }

    /// Whether global index `i` belongs to this worker (round-robin ownership).
    pub fn owns(&self, i: usize) -> bool {
        i % self.workers == self.idx
    }

    /// Global indexes in `0..n` this worker owns.
    pub fn my_share(&self, n: usize) -> impl Iterator<Item = usize> + 'static {
        (self.idx..n).step_by(self.workers.max(1))
    }

    /// Waits until the main thread enters `phase` (or a later one); returns its start time.
    pub async fn wait_phase(&self, phase: u32) -> Result<u64, Stopped> {
        loop {
            if self.shared.stopping() {
                return Err(Stopped);
            }
            if self.shared.phase.load(Ordering::Acquire) >= phase {
                return Ok(self.shared.start_ns.load(Ordering::Acquire));
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Tells the main thread this worker finished its part of the current phase.
    pub fn set_ready(&self) {
        self.me().ready.store(true, Ordering::Release);
    }

    /// Whether the run must stop.
    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }
}

/// Starts one worker per CPU of `spec`, each running `f(env)`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_workers<T, F, Fut>(
    spec: &WorkerSpec,
    shared: &Arc<Shared>,
    targets: &[SocketAddr],
    prefix: &str,
    connect_timeout: Duration,
    f: F,
) -> anyhow::Result<Vec<ExecutorJoinHandle<anyhow::Result<T>>>>
where
    F: Fn(WorkerEnv) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = anyhow::Result<T>> + 'static,
    T: Send + 'static,
{
    clock::epoch();
    let targets = Arc::new(targets.to_vec());
    let prefix: Arc<str> = prefix.into();
    let n = spec.cpus.len();
    let mut handles = Vec::with_capacity(n);
    for (idx, &cpu) in spec.cpus.iter().enumerate() {
        let placement = if spec.pin {
            Placement::Fixed(cpu)
        } else {
            Placement::Unbound
        };
        let mut b = LocalExecutorBuilder::new(placement)
            .name(&format!("iris-load-{idx}"))
            .io_memory(spec.io_memory)
            // 4096 entries: the kernel sizes a ring's poll-cancel hash from its completion queue
            // (256 buckets from 8,192 entries), and glommio cancels a timer on every turn, a
            // lookup that walks one bucket of the (up to 10,000s of) armed socket polls.
            .ring_depth(4096);
        if spec.spin_us > 0 {
            b = b.spin_before_park(Duration::from_micros(spec.spin_us));
        }
        let (shared, targets, prefix) = (shared.clone(), targets.clone(), prefix.clone());
        let f = f.clone();
        let h = b
            .spawn(move || async move {
                // The histogram is thread-local (`Rc`): the env is built on this thread.
                let env = WorkerEnv {
                    idx,
                    workers: n,
                    shared,
                    hist: LocalHist::default(),
                    lag: LocalHist::default(),
                    send_ack: LocalHist::default(),
                    targets,
                    prefix,
                    connect_timeout,
                };
                let flusher = {
                    let env = env.clone();
                    glommio::spawn_local(async move {
                        loop {
                            glommio::timer::sleep(FLUSH_EVERY).await;
                            env.hist.flush(&env.me().pending);
                            env.lag.flush(&env.me().pending_lag);
                            env.send_ack.flush(&env.me().pending_send_ack);
                        }
                    })
                };
                let r = f(env.clone()).await;
                drop(flusher);
                env.hist.flush(&env.me().pending);
                env.lag.flush(&env.me().pending_lag);
                env.send_ack.flush(&env.me().pending_send_ack);
                if let Err(e) = &r {
                    let me = env.me();
                    if let Ok(mut slot) = me.error.lock() {
                        slot.get_or_insert_with(|| format!("worker {idx}: {e:#}"));
                    }
                    me.failed.store(true, Ordering::Release);
                }
                r
            })
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot start worker {idx} on CPU {cpu}"))?;
        handles.push(h);
    }
    Ok(handles)
}

/// Joins the workers, returning their results (the first error wins).
pub fn join_workers<T: Send + 'static>(
    handles: Vec<ExecutorJoinHandle<anyhow::Result<T>>>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => out.push(t),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("worker thread failed: {e}"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_cpus("0-2, 5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert!(!allowed_cpus().is_empty());
        assert!(raise_nofile() > 0);
    }
}
