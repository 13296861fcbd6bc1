//! The main thread's view of a run: the progress line every second and the time series.
//!
//! While the workers run, the main thread sleeps in short steps inside [`Monitor::wait_until`];
//! once a second it sums the workers' counters, takes their pending latencies into a
//! per-second and a cumulative histogram, prints one progress line on standard error (rate,
//! p99 of the second and of the run so far, connections, errors) and appends a [`Tick`]. A
//! worker failure stops the run and is returned as the error.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::clock;
use super::report::{fmt_num, Tick};
use super::stats::{new_hist, Shared, Totals};

const STEP: Duration = Duration::from_millis(10);

/// Progress and time series of one run; see the module documentation.
#[derive(Debug)]
pub struct Monitor {
    pub shared: Arc<Shared>,
    quiet: bool,
    scenario: String,
    start_ns: u64,
    last_tick_ns: u64,
    last: Totals,
    interval: Histogram<u64>,
    /// Every latency recorded since the last [`Monitor::reset_cumulative`].
    pub cumulative: Histogram<u64>,
    /// Every sender lag recorded (open-loop senders).
    pub lag: Histogram<u64>,
    /// Every SEND → SEND_ACK latency recorded (protocol v2 senders).
    pub send_ack: Histogram<u64>,
    pub ticks: Vec<Tick>,
}

impl Monitor {
    /// Starts monitoring `shared`; `quiet` suppresses the progress line.
    pub fn new(shared: Arc<Shared>, scenario: &str, quiet: bool) -> Self {
        let now = clock::now_ns();
        Self {
            shared,
            quiet,
            scenario: scenario.into(),
            start_ns: now,
            last_tick_ns: now,
            last: Totals::default(),
            interval: new_hist(),
            cumulative: new_hist(),
            lag: new_hist(),
            send_ack: new_hist(),
            ticks: Vec::new(),
        }
    }

    /// Seconds since the monitor started.
    pub fn elapsed_secs(&self) -> f64 {
        (clock::now_ns() - self.start_ns) as f64 / 1e9
    }

    /// Takes pending latencies now (so the cumulative histogram is complete).
    pub fn collect(&mut self) {
        self.shared.take_pending(&mut self.interval);
        self.shared.take_pending_lag(&mut self.lag);
        self.shared.take_pending_send_ack(&mut self.send_ack);
    }

    /// Forgets the latencies recorded so far (the end of a warm-up).
    pub fn reset_cumulative(&mut self) {
        self.collect();
        self.interval.reset();
        self.cumulative.reset();
        self.lag.reset();
        self.send_ack.reset();
    }

    /// Prints a free-form line in the progress stream.
    pub fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("[{:>6.1}s] {} {msg}", self.elapsed_secs(), self.scenario);
        }
    }

    /// One progress tick: rates since the last tick, latency of the interval.
    pub fn tick(&mut self) {
        let now = clock::now_ns();
        let dt = (now - self.last_tick_ns).max(1) as f64 / 1e9;
        self.last_tick_ns = now;
        self.collect();
        let t = self.shared.totals();
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let tick = Tick {
            t_s: (now - self.start_ns) as f64 / 1e9,
            sent_per_s: d(t.sent, self.last.sent),
            delivered_per_s: d(t.delivered, self.last.delivered),
            logins_per_s: d(t.logins, self.last.logins),
            p50_us: q_us(&self.interval, 0.5),
            p99_us: q_us(&self.interval, 0.99),
            max_us: self.interval.max() as f64 / 1e3,
            connections: t.connections,
            errors: t.errors,
        };
        self.cumulative.add(&self.interval).ok();
        self.interval.reset();
        self.last = t;
        if !self.quiet {
            let mut line = format!(
                "[{:>6.1}s] {} conns {}",
                tick.t_s,
                self.scenario,
                fmt_num(t.connections as f64)
            );
            if tick.sent_per_s > 0.0 || tick.delivered_per_s > 0.0 {
                line += &format!(
                    " | sent {}/s delivered {}/s",
                    fmt_num(tick.sent_per_s),
                    fmt_num(tick.delivered_per_s)
                );
            }
            if tick.logins_per_s > 0.0 {
                line += &format!(" | logins {}/s", fmt_num(tick.logins_per_s));
            }
            if !self.cumulative.is_empty() {
                let now = if tick.p99_us > 0.0 {
                    format!("{:.3} ms", tick.p99_us / 1e3)
                } else {
                    "-".into()
                };
                line += &format!(
                    " | p99 {now} (run {:.3} ms)",
                    q_us(&self.cumulative, 0.99) / 1e3
                );
            }
            line += &format!(
                " | in flight {} dup {} reord {} err {}",
                fmt_num(t.sent.saturating_sub(t.delivered) as f64),
                t.duplicates,
                t.reordered,
                t.errors
            );
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
        self.ticks.push(tick);
    }

    /// Sleeps until `cond` holds (→ `Ok(true)`) or `deadline_ns` passes (→ `Ok(false)`),
    /// ticking every second. A worker failure stops the run and is the error.
    pub fn wait_until(
        &mut self,
        mut cond: impl FnMut(&Shared) -> bool,
        deadline_ns: Option<u64>,
    ) -> anyhow::Result<bool> {
        loop {
            if let Some(e) = self.shared.failure() {
                self.shared.stop.store(true, Ordering::Release);
                anyhow::bail!("{e}");
            }
            if cond(&self.shared) {
                return Ok(true);
            }
            let now = clock::now_ns();
            if deadline_ns.is_some_and(|d| now >= d) {
                return Ok(false);
            }
            let next_tick = self.last_tick_ns + 1_000_000_000;
            if now >= next_tick {
                self.tick();
                continue;
            }
            let mut wake = next_tick.min(now + STEP.as_nanos() as u64);
            if let Some(d) = deadline_ns {
                wake = wake.min(d);
            }
            clock::block_until_ns(wake);
        }
    }

    /// Sleeps until `ns`, ticking.
    pub fn sleep_until(&mut self, ns: u64) -> anyhow::Result<()> {
        self.wait_until(|_| false, Some(ns)).map(|_| ())
    }
}

fn q_us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1e3
    }
}
