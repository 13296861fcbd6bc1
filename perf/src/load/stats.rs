//! Counters and latency histograms shared between the worker threads and the main thread.
//!
//! Each worker owns one [`WorkerShared`] (cache-line aligned, so workers never write the same
//! line): relaxed atomic counters the main thread reads every second, and a `pending` histogram.
//! Workers record latencies into a thread-local [`LocalHist`] (no lock per message) and move it
//! into `pending` every [`FLUSH_EVERY`]; the main thread takes `pending` once a second to build
//! the per-second and cumulative histograms. The control state of a run (phase, start time,
//! stop flag) lives in [`Shared`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::conn::Protocol;
use super::transport::Connector;
use serde::{Deserialize, Serialize};

/// How often a worker moves its local histogram to the main thread.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Largest latency a histogram holds (longer ones are clamped to it): one hour, in ns.
pub const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// A new latency histogram in nanoseconds, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// The counters of one worker; all are totals since the start of the run except `connections`,
/// a gauge.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages written to a socket.
    pub sent: AtomicU64,
    /// Distinct messages received (duplicates excluded).
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub reordered: AtomicU64,
    /// Failed connects, logins, reads or writes, and ERROR frames.
    pub errors: AtomicU64,
    /// Messages that do not belong where they arrived (wrong stream, unknown payload, a
    /// sequence number never sent).
    pub unexpected: AtomicU64,
    /// RATE_LIMITED answers.
    pub rate_limited: AtomicU64,
    /// Open, logged-in connections (gauge).
    pub connections: AtomicU64,
    /// Successful connect + login sequences (or logins).
    pub logins: AtomicU64,
    /// Senders (or other tasks) that finished their work.
    pub finished: AtomicU64,
    /// Protocol v2: SEND_ACKs received by senders.
    pub send_acks: AtomicU64,
    /// Latest event time of interest (e.g. the last arrival), in clock ns.
    pub last_event_ns: AtomicU64,
}

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads a counter.
#[inline]
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A sum of every worker's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub sent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub errors: u64,
    pub unexpected: u64,
    pub rate_limited: u64,
    pub connections: u64,
    pub logins: u64,
    pub finished: u64,
    /// Protocol v2: SEND_ACKs received (absent in reports of older versions).
    #[serde(default)]
    pub send_acks: u64,
}

/// Everything one worker shares with the main thread.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerShared {
    pub c: Counters,
    /// Latencies recorded since the main thread last took them.
    pub pending: Mutex<Histogram<u64>>,
    /// Sender lag (how late a message was written after its intended time), likewise.
    pub pending_lag: Mutex<Histogram<u64>>,
    /// Protocol v2: SEND → SEND_ACK latencies, likewise.
    pub pending_send_ack: Mutex<Histogram<u64>>,
    /// The worker finished its setup for the current phase.
    pub ready: AtomicBool,
    /// The worker failed; the message is in `error`.
    pub failed: AtomicBool,
    pub error: Mutex<Option<String>>,
    /// Errors by description (counted in `c.errors` too), for the report's notes.
    pub error_kinds: Mutex<BTreeMap<String, u64>>,
}

impl WorkerShared {
    /// Counts one error of the given description.
    pub fn error(&self, what: &str) {
        add(&self.c.errors, 1);
        if let Ok(mut k) = self.error_kinds.lock() {
            let key: String = what.chars().take(120).collect();
            *k.entry(key).or_insert(0) += 1;
        }
    }
}

impl Default for WorkerShared {
    fn default() -> Self {
        Self {
            c: Counters::default(),
            pending: Mutex::new(new_hist()),
            pending_lag: Mutex::new(new_hist()),
            pending_send_ack: Mutex::new(new_hist()),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            error_kinds: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The state of one run, shared by all threads.
#[derive(Debug)]
pub struct Shared {
    pub workers: Vec<WorkerShared>,
    /// Scenario-defined phase number, set by the main thread.
    pub phase: AtomicU32,
    /// Clock time at which the current phase's timed work starts (0 = not set).
    pub start_ns: AtomicU64,
    /// Everything must stop now.
    pub stop: AtomicBool,
    /// The client protocol of every connection of the run.
    pub protocol: Protocol,
    /// The transport of every connection of the run (`--transport`).
    pub connector: Connector,
    /// Local addresses new connections are made from, in turn (`--source-ips`); empty: the
    /// kernel's choice.
    pub sources: Vec<std::net::IpAddr>,
    /// The next of `sources` to use.
    pub next_source: std::sync::atomic::AtomicUsize,
    /// `--jwt-secret`: LOGIN carries a token for the user.
    pub tokens: Option<super::conn::Tokens>,
}

impl Shared {
    /// State for `n` workers speaking protocol v1.
    pub fn new(n: usize) -> Arc<Self> {
        Self::with_protocol(n, Protocol::V1)
    }

    /// State for `n` workers speaking `protocol`.
    pub fn with_protocol(n: usize, protocol: Protocol) -> Arc<Self> {
        Self::with_transport(n, protocol, Connector::tcp(), Vec::new(), None)
    }

    /// State for `n` workers speaking `protocol` over `connector`'s transport, connecting from
    /// `sources` in turn (empty: from the kernel's choice), logging in with `tokens` if given.
    pub fn with_transport(
        n: usize,
        protocol: Protocol,
        connector: Connector,
        sources: Vec<std::net::IpAddr>,
        tokens: Option<super::conn::Tokens>,
    ) -> Arc<Self> {
        Arc::new(Self {
            workers: (0..n).map(|_| WorkerShared::default()).collect(),
            phase: AtomicU32::new(0),
            start_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            protocol,
            connector,
            sources,
            next_source: std::sync::atomic::AtomicUsize::new(0),
            tokens,
        })
    }

    /// What LOGIN (HELLO) carries for `user`: the name, or `user:token` with `--jwt-secret`.
    pub fn login_body(&self, user: &[u8]) -> Vec<u8> {
        match &self.tokens {
            Some(t) => t.login_body(user),
            None => user.to_vec(),
        }
    }

    /// Sum of all workers' counters.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for w in &self.workers {
            let c = &w.c;
            t.sent += get(&c.sent);
            t.delivered += get(&c.delivered);
            t.duplicates += get(&c.duplicates);
            t.reordered += get(&c.reordered);
            t.errors += get(&c.errors);
            t.unexpected += get(&c.unexpected);
            t.rate_limited += get(&c.rate_limited);
            t.connections += get(&c.connections);
            t.logins += get(&c.logins);
            t.finished += get(&c.finished);
            t.send_acks += get(&c.send_acks);
        }
        t
    }

    /// Latest `last_event_ns` of any worker.
    pub fn last_event_ns(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| get(&w.c.last_event_ns))
            .max()
            .unwrap_or(0)
    }

    /// Whether every worker reported ready.
    pub fn all_ready(&self) -> bool {
        self.workers.iter().all(|w| w.ready.load(Ordering::Acquire))
    }

    /// Clears every worker's ready flag (before a new phase).
    pub fn clear_ready(&self) {
        for w in &self.workers {
            w.ready.store(false, Ordering::Release);
        }
    }

    /// The first worker failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.workers
            .iter()
            .filter(|w| w.failed.load(Ordering::Acquire))
            .find_map(|w| w.error.lock().ok().and_then(|e| e.clone()))
    }

    /// Enters `phase`, whose timed work starts at `start_ns`.
    pub fn set_phase(&self, phase: u32, start_ns: u64) {
        self.start_ns.store(start_ns, Ordering::Release);
        self.phase.store(phase, Ordering::Release);
    }

    /// Whether the run must stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Every worker's errors by description, merged.
    pub fn error_kinds(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for w in &self.workers {
            if let Ok(k) = w.error_kinds.lock() {
                for (e, n) in k.iter() {
                    *out.entry(e.clone()).or_insert(0) += n;
                }
            }
        }
        out
    }

    /// Takes every worker's pending latencies.
    pub fn take_pending(&self, into: &mut Histogram<u64>) {
        self.take(into, |w| &w.pending);
    }

    /// Takes every worker's pending sender lags.
    pub fn take_pending_lag(&self, into: &mut Histogram<u64>) {
        self.take(into, |w| &w.pending_lag);
    }

    /// Takes every worker's pending SEND → SEND_ACK latencies.
    pub fn take_pending_send_ack(&self, into: &mut Histogram<u64>) {
        self.take(into, |w| &w.pending_send_ack);
    }

    fn take(
        &self,
        into: &mut Histogram<u64>,
        slot: impl Fn(&WorkerShared) -> &Mutex<Histogram<u64>>,
    ) {
        for w in &self.workers {
            if let Ok(mut p) = slot(w).lock() {
                if !p.is_empty() {
                    into.add(&*p).ok();
                    p.reset();
                }
            }
        }
    }
}

/// A worker's thread-local latency histogram, flushed to its [`WorkerShared::pending`].
#[derive(Debug, Clone)]
pub struct LocalHist(Rc<RefCell<Histogram<u64>>>);

impl Default for LocalHist {
    fn default() -> Self {
        Self(Rc::new(RefCell::new(new_hist())))
    }
}

impl LocalHist {
    /// Records one latency in ns (clamped to the histogram range).
    #[inline]
    pub fn record(&self, ns: u64) {
        self.0
            .borrow_mut()
            .saturating_record(ns.clamp(1, HIST_MAX_NS));
    }

    /// Moves what was recorded to `to` (a worker's `pending` or `pending_lag`).
    pub fn flush(&self, to: &Mutex<Histogram<u64>>) {
        let mut h = self.0.borrow_mut();
        if h.is_empty() {
            return;
        }
        if let Ok(mut p) = to.lock() {
            p.add(&*h).ok();
        }
        h.reset();
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            p9999_us: us(h.value_at_quantile(0.9999)),
            max_us: us(h.max()),
        }
    }
}

/// The percentile distribution of a histogram as `(quantile, microseconds)` points, for charts.
pub fn distribution(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [
        0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
    ]
    .iter()
    .map(|&q| (q, h.value_at_quantile(q) as f64 / 1000.0))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_pending() {
        let s = Shared::new(2);
        add(&s.workers[0].c.sent, 3);
        add(&s.workers[1].c.sent, 4);
        add(&s.workers[1].c.delivered, 2);
        let t = s.totals();
        assert_eq!((t.sent, t.delivered), (7, 2));
        let l = LocalHist::default();
        l.record(1_000);
        l.record(2_000_000);
        l.record(0);
        l.flush(&s.workers[0].pending);
        let mut h = new_hist();
        s.take_pending(&mut h);
        assert_eq!(h.len(), 3);
        let sum = LatencySummary::of(&h);
        assert!(sum.max_us >= 1999.0 && sum.max_us <= 2001.0);
        assert!(sum.p50_us >= 0.99 && sum.p50_us <= 1.01);
        s.take_pending(&mut h);
        assert_eq!(h.len(), 3);
    }
}
