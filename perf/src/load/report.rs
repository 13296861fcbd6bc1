//! The result of one run: the JSON document of `--json FILE` and the final table.
//!
//! A [`Report`] holds everything needed to reproduce and judge a figure: the command line, the
//! UTC start time, the host (CPU model, cores, kernel, load average before and after), the
//! scenario's configuration, the final counters, the headline figures (`figures`, a map of
//! named numbers such as `delivered_per_s`), the latency summary and distribution, a
//! per-second time series and, when the server's pid was given, its memory and CPU use.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::host::{HostInfo, ProcMem};
use super::stats::{LatencySummary, Totals};

/// One second of a run, as seen by the progress line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the start of the run.
    pub t_s: f64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub logins_per_s: f64,
    /// Latency of this second only.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub connections: u64,
    pub errors: u64,
}

/// CPU of the server's threads of one name during the measured window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadCpu {
    /// The thread name (`iris-shard-0`, `iris-core`, ...).
    pub name: String,
    pub cpu_secs: f64,
    pub cores_busy: f64,
}

/// The server process, sampled around the measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerSample {
    pub pid: u32,
    pub mem_before: ProcMem,
    pub mem_after: ProcMem,
    /// CPU seconds the server used during the measured window.
    pub cpu_secs: f64,
    /// `cpu_secs` / window length: cores kept busy.
    pub cpu_cores_busy: f64,
    /// The same per thread name (empty in reports of older versions).
    #[serde(default)]
    pub threads: Vec<ThreadCpu>,
}

/// Everything a run measured; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    /// Free-form name given with `--label` (the benchmark suite names its runs).
    pub label: Option<String>,
    pub command: Vec<String>,
    pub started_utc: String,
    pub wall_secs: f64,
    pub host: HostInfo,
    pub targets: Vec<String>,
    /// CPUs the load generator's workers ran on.
    pub load_cpus: Vec<usize>,
    /// The scenario's options.
    pub config: serde_json::Value,
    /// Counters at the end of the run.
    pub totals: Totals,
    /// Messages sent and never received (exact, from the sequence numbers).
    pub lost: u64,
    /// Headline figures by name (rates per second, bytes, seconds).
    pub figures: BTreeMap<String, f64>,
    /// What `latency` measures.
    pub latency_what: String,
    pub latency: Option<LatencySummary>,
    /// `(quantile, µs)` points of the latency distribution.
    pub latency_distribution: Vec<(f64, f64)>,
    /// Open-loop runs: how late the generator wrote messages after their intended send time
    /// (its own share of the latency; large values mean the generator fell behind).
    #[serde(default)]
    pub sender_lag: Option<LatencySummary>,
    /// Protocol v2 `pairs`: SEND → SEND_ACK (the sender's "sent" tick), measured like
    /// `latency` (from the intended send time in open loop, the actual send in closed loop).
    #[serde(default)]
    pub send_ack_latency: Option<LatencySummary>,
    pub timeseries: Vec<Tick>,
    pub server: Option<ServerSample>,
    /// CPU seconds of the load generator / wall seconds.
    pub loadgen_cores_busy: f64,
    pub notes: Vec<String>,
}

impl Report {
    /// A report for `scenario` with the tool name, version and command line filled in.
    pub fn new(scenario: &str, command: Vec<String>) -> Self {
        Self {
            tool: "iris-load".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            scenario: scenario.into(),
            command,
            ..Self::default()
        }
    }

    /// Sets a headline figure.
    pub fn figure(&mut self, name: &str, value: f64) {
        self.figures.insert(name.into(), value);
    }

    /// A headline figure, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }

    /// Writes the JSON document to `path` (creating parent directories).
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads a JSON document written by [`Report::write_json`].
    pub fn read_json(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("bad report {}", path.display()))
    }

    /// The final table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let label = self.label.as_deref().unwrap_or("");
        let _ = writeln!(
            s,
            "== iris-load {} {label} ({}, {} s wall) ==",
            self.scenario,
            self.started_utc,
            fmt_num(self.wall_secs)
        );
        let _ = writeln!(
            s,
            "host: {} x{} | kernel {} | load {:.2} -> {:.2}",
            self.host.cpu_model,
            self.host.cpus_online,
            self.host.kernel,
            self.host.loadavg_start[0],
            self.host.loadavg_end[0]
        );
        for (k, v) in &self.figures {
            let _ = writeln!(s, "{k:<28} {}", fmt_num(*v));
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "{:<28} sent {} delivered {} lost {} duplicated {} reordered {} errors {} unexpected {} rate_limited {}",
            "counts",
            t.sent,
            t.delivered,
            self.lost,
            t.duplicates,
            t.reordered,
            t.errors,
            t.unexpected,
            t.rate_limited
        );
        if let Some(l) = &self.latency {
            let _ = writeln!(
                s,
                "latency ({}) in ms, {} samples:",
                self.latency_what, l.count
            );
            let _ = writeln!(
                s,
                "  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  p99.99 {:.3}  max {:.3}  mean {:.3}",
                l.p50_us / 1e3,
                l.p90_us / 1e3,
                l.p99_us / 1e3,
                l.p999_us / 1e3,
                l.p9999_us / 1e3,
                l.max_us / 1e3,
                l.mean_us / 1e3
            );
        }
        if let Some(l) = &self.sender_lag {
            let _ = writeln!(
                s,
                "sender lag (write time - intended time) in ms: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.p50_us / 1e3,
                l.p99_us / 1e3,
                l.p999_us / 1e3,
                l.max_us / 1e3
            );
        }
        if let Some(l) = &self.send_ack_latency {
            let _ = writeln!(
                s,
                "SEND -> SEND_ACK in ms, {} samples: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.count,
                l.p50_us / 1e3,
                l.p99_us / 1e3,
                l.p999_us / 1e3,
                l.max_us / 1e3
            );
        }
        if let Some(sv) = &self.server {
            let _ = writeln!(
                s,
                "server pid {}: rss {} -> {} KiB (anon {} -> {} KiB), {:.2} cores busy",
                sv.pid,
                sv.mem_before.rss_kib,
                sv.mem_after.rss_kib,
                sv.mem_before.rss_anon_kib,
                sv.mem_after.rss_anon_kib,
                sv.cpu_cores_busy
            );
            for t in sv.threads.iter().filter(|t| t.cpu_secs > 0.0) {
                let _ = writeln!(s, "  thread {}: {:.2} cores busy", t.name, t.cores_busy);
            }
        }
        let _ = writeln!(
            s,
            "load generator: {:.2} cores busy",
            self.loadgen_cores_busy
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// A number for humans: thousands separators for large values, 3 decimals for small ones.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 1000.0 {
        let r = v.round() as i128;
        let digits = r.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if r < 0 {
            out.insert(0, '-');
        }
        out
    } else if v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(-1234.0), "-1,234");
        assert_eq!(fmt_num(999.0), "999");
        assert_eq!(fmt_num(0.5), "0.500");
    }

    #[test]
    fn json_round_trip() {
        let mut r = Report::new("pairs", vec!["iris-load".into(), "pairs".into()]);
        r.figure("delivered_per_s", 12.5);
        r.latency = Some(LatencySummary::default());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x/r.json");
        r.write_json(&p).unwrap();
        assert_eq!(Report::read_json(&p).unwrap(), r);
        assert!(r.table().contains("delivered_per_s"));
    }
}
