//! `iris-load report`: charts and the generated part of `BENCHMARKS.md`, from result JSON.
//!
//! Inputs, all in the results directory (`perf/results` by default):
//!
//! - the [`Report`]s written by `iris-load --json`, recognised by their `--label`: `echo-1` and
//!   `echo-8` (the loopback ceiling), `connect`, `saturation` (closed loop), `throughput-goal`
//!   (open loop at the goal rate), `latency-goal` (open loop at half of it),
//!   `latency-25|50|75`, `offline`, `logins`, `logins-auth` (against an edge with auth on),
//!   `logins-relogin` (any other label is listed with the rest);
//! - `meta.json` (optional, written by `scripts/bench.sh`): date, commit, CPUs of the server and
//!   of the load generator, a note on machine load;
//! - `criterion.json`: the criterion micro-benchmarks, gathered from `--criterion DIR`
//!   (`target/criterion`) when given, else as left by the last gathering.
//!
//! Outputs: `latency.svg` (latency percentiles against offered rate, runs labelled
//! `latency-*`), `throughput.svg`
//! (delivered messages per second over time), and the section of the Markdown file between
//! [`BEGIN`] and [`END`] (added at the end if missing), rewritten from the JSON alone. Every
//! throughput figure is shown beside the echo ceiling as a ratio, and every goal of
//! `shared/DESIGN.md` beside the figure that measures it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::report::{fmt_num, Report};

/// Start marker of the generated section.
pub const BEGIN: &str = "<!-- BEGIN GENERATED: iris-load report (do not edit by hand) -->";
/// End marker of the generated section.
pub const END: &str = "<!-- END GENERATED -->";

/// Options of `report`.
#[derive(Debug, Clone, Args)]
pub struct ReportOpts {
    /// Directory of result JSON files (charts are written there too).
    #[arg(long, default_value = "perf/results")]
    pub results: PathBuf,
    /// Criterion output directory to gather micro-benchmarks from (e.g. target/criterion).
    #[arg(long)]
    pub criterion: Option<PathBuf>,
    /// Markdown file whose generated section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub markdown: PathBuf,
}

/// Facts about a benchmark-suite run (`meta.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date_utc: String,
    pub git_commit: String,
    pub server_cpus: String,
    pub load_cpus: String,
    /// Cores the server used (for per-core figures).
    pub server_cores: f64,
    pub note: String,
    #[serde(default)]
    pub quick: bool,
    /// How the servers were started (CPU pinning included).
    #[serde(default)]
    pub server_commands: Vec<String>,
}

/// One criterion micro-benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Micro {
    pub id: String,
    /// Mean time of one iteration, ns.
    pub mean_ns: f64,
    pub median_ns: f64,
    /// Elements per iteration (criterion `Throughput::Elements`), 1 if none.
    pub elements: f64,
}

impl Micro {
    /// Nanoseconds per element (median).
    pub fn ns_per_element(&self) -> f64 {
        self.median_ns / self.elements.max(1.0)
    }
}

/// Runs `report`.
pub fn run(o: &ReportOpts) -> anyhow::Result<()> {
    let micro_path = o.results.join("criterion.json");
    if let Some(dir) = &o.criterion {
        let micro = gather_criterion(dir)?;
        std::fs::create_dir_all(&o.results)?;
        std::fs::write(&micro_path, serde_json::to_string_pretty(&micro)? + "\n")?;
        eprintln!("{} micro-benchmarks from {}", micro.len(), dir.display());
    }
    let micro: Vec<Micro> = match std::fs::read_to_string(&micro_path) {
        Ok(t) => serde_json::from_str(&t).context("bad criterion.json")?,
        Err(_) => Vec::new(),
    };
    let meta: Option<Meta> = std::fs::read_to_string(o.results.join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let runs = load_reports(&o.results)?;
    anyhow::ensure!(
        !runs.is_empty() || !micro.is_empty(),
        "no results in {}",
        o.results.display()
    );
    draw_latency(&runs, &o.results.join("latency.svg"))?;
    draw_throughput(&runs, &o.results.join("throughput.svg"))?;
    let chart_dir = relative_dir(&o.markdown, &o.results);
    let generated = render(&runs, &micro, meta.as_ref(), &chart_dir);
    let old = std::fs::read_to_string(&o.markdown).unwrap_or_default();
    std::fs::write(&o.markdown, splice(&old, &generated))
        .with_context(|| format!("cannot write {}", o.markdown.display()))?;
    eprintln!(
        "{} runs, charts in {}, tables in {}",
        runs.len(),
        o.results.display(),
        o.markdown.display()
    );
    Ok(())
}

/// The path of `dir` as written from the Markdown file's directory (for image links).
fn relative_dir(markdown: &Path, dir: &Path) -> String {
    let base = markdown.parent().unwrap_or(Path::new(""));
    let d = dir.strip_prefix(base).unwrap_or(dir);
    let s = d.to_string_lossy().into_owned();
    if s.is_empty() {
        ".".into()
    } else {
        s
    }
}

/// Every report in `dir`, by label (file stem when unlabelled), sorted.
pub fn load_reports(dir: &Path) -> anyhow::Result<BTreeMap<String, Report>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let p = e?.path();
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if p.extension().and_then(|x| x.to_str()) != Some("json")
            || stem == "criterion"
            || stem == "meta"
        {
            continue;
        }
        let r = Report::read_json(&p)?;
        let key = r.label.clone().unwrap_or_else(|| stem.to_string());
        out.insert(key, r);
    }
    Ok(out)
}

/// Reads criterion's `*/new/{benchmark,estimates}.json` under `dir`.
pub fn gather_criterion(dir: &Path) -> anyhow::Result<Vec<Micro>> {
    let mut out = Vec::new();
    walk(dir, &mut |p| {
        if p.file_name().and_then(|n| n.to_str()) != Some("benchmark.json")
            || p.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                != Some("new")
        {
            return;
        }
        let read = |f: &Path| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()
        };
        let (Some(b), Some(e)) = (read(p), read(&p.with_file_name("estimates.json"))) else {
            return;
        };
        let elements = b["throughput"]["Elements"]
            .as_f64()
            .or_else(|| b["throughput"]["Bytes"].as_f64())
            .unwrap_or(1.0);
        out.push(Micro {
            id: b["full_id"].as_str().unwrap_or("?").to_string(),
            mean_ns: e["mean"]["point_estimate"].as_f64().unwrap_or(0.0),
            median_ns: e["median"]["point_estimate"].as_f64().unwrap_or(0.0),
            elements,
        });
    });
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// Replaces the generated section of `old` (or appends one).
pub fn splice(old: &str, generated: &str) -> String {
    let block = format!("{BEGIN}\n{generated}\n{END}\n");
    match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if b > a => {
            let tail = &old[b + END.len()..];
            let tail = tail.strip_prefix('\n').unwrap_or(tail);
            format!("{}{block}{tail}", &old[..a])
        }
        _ => {
            let mut s = old.to_string();
            if !s.is_empty() && !s.ends_with("\n\n") {
                s.push_str(if s.ends_with('\n') { "\n" } else { "\n\n" });
            }
            s + &block
        }
    }
}

fn latency_runs(runs: &BTreeMap<String, Report>) -> Vec<&Report> {
    let mut v: Vec<&Report> = runs
        .values()
        .filter(|r| {
            r.scenario == "pairs" && r.get("offered_per_s").is_some() && r.latency.is_some()
        })
        .collect();
    v.sort_by(|a, b| {
        a.get("offered_per_s")
            .partial_cmp(&b.get("offered_per_s"))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

/// Latency percentiles (ms, log scale) against offered rate, one line per percentile.
pub fn draw_latency(runs: &BTreeMap<String, Report>, path: &Path) -> anyhow::Result<()> {
    let pts: Vec<&Report> = latency_runs(runs)
        .into_iter()
        .filter(|r| r.label.as_deref().is_some_and(|l| l.starts_with("latency")))
        .collect();
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    if pts.is_empty() {
        root.titled("no open-loop pairs runs", ("sans-serif", 20))
            .map_err(chart_err)?;
        return root.present().map_err(chart_err);
    }
    type Pick = fn(&super::stats::LatencySummary) -> f64;
    let series: [(&str, Pick, RGBColor); 5] = [
        ("p50", |l| l.p50_us, RGBColor(31, 119, 180)),
        ("p90", |l| l.p90_us, RGBColor(44, 160, 44)),
        ("p99", |l| l.p99_us, RGBColor(255, 127, 14)),
        ("p99.9", |l| l.p999_us, RGBColor(214, 39, 40)),
        ("max", |l| l.max_us, RGBColor(120, 120, 120)),
    ];
    let xs: Vec<f64> = pts.iter().filter_map(|r| r.get("offered_per_s")).collect();
    let xmax = xs.iter().cloned().fold(1.0, f64::max) * 1.1;
    let mut ymin = f64::MAX;
    let mut ymax = f64::MIN;
    for r in &pts {
        let l = r.latency.unwrap_or_default();
        for (_, f, _) in &series {
            let v = (f(&l) / 1e3).max(1e-3);
            ymin = ymin.min(v);
            ymax = ymax.max(v);
        }
    }
    let (ymin, ymax) = (ymin / 2.0, ymax * 2.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "iris-edge latency (end to end, from intended send) vs offered rate",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("offered messages/s")
        .y_desc("latency, ms (log)")
        .x_label_formatter(&|x| fmt_num(*x))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(chart_err)?;
    for (name, f, color) in series {
        let line: Vec<(f64, f64)> = pts
            .iter()
            .filter_map(|r| Some((r.get("offered_per_s")?, (f(&r.latency?) / 1e3).max(1e-3))))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(chart_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(chart_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

/// Delivered messages per second over time, one line per `pairs` run.
pub fn draw_throughput(runs: &BTreeMap<String, Report>, path: &Path) -> anyhow::Result<()> {
    let lines: Vec<(&String, &Report)> = runs
        .iter()
        .filter(|(_, r)| r.scenario == "pairs" && !r.timeseries.is_empty())
        .collect();
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    if lines.is_empty() {
        root.titled("no pairs runs", ("sans-serif", 20))
            .map_err(chart_err)?;
        return root.present().map_err(chart_err);
    }
    let tmax = lines
        .iter()
        .flat_map(|(_, r)| r.timeseries.iter().map(|t| t.t_s))
        .fold(1.0, f64::max);
    let ymax = lines
        .iter()
        .flat_map(|(_, r)| r.timeseries.iter().map(|t| t.delivered_per_s))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "iris-edge delivered messages/s over time",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc("delivered messages/s")
        .y_label_formatter(&|y| fmt_num(*y))
        .draw()
        .map_err(chart_err)?;
    for (i, (label, r)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = r
            .timeseries
            .iter()
            .map(|t| (t.t_s, t.delivered_per_s))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(chart_err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("chart: {e:?}")
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1e3)
}

/// Goal status: met, not met, or not measured.
fn status(v: Option<f64>, ok: impl Fn(f64) -> bool) -> &'static str {
    match v {
        Some(v) if ok(v) => "met",
        Some(_) => "**not met**",
        None => "not measured",
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

/// The generated Markdown: goals, ceiling, latency, all runs, micro-benchmarks, commands.
pub fn render(
    runs: &BTreeMap<String, Report>,
    micro: &[Micro],
    meta: Option<&Meta>,
    chart_dir: &str,
) -> String {
    let mut s = String::new();
    let get = |label: &str, fig: &str| runs.get(label).and_then(|r| r.get(fig));
    let cores = meta
        .map(|m| m.server_cores)
        .filter(|c| *c > 0.0)
        .unwrap_or(1.0);
    let echo1 = get("echo-1", "messages_per_s");
    let echo8 = get("echo-8", "messages_per_s");
    let ratio = |v: f64| -> String {
        let mut parts = Vec::new();
        if let Some(e) = echo8 {
            parts.push(format!("{:.2}× echo 8/read", v / e));
        }
        if let Some(e) = echo1 {
            parts.push(format!("{:.2}× echo 1/read", v / e));
        }
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    };

    if let Some(m) = meta {
        let _ = writeln!(s, "### Run\n");
        let _ =
            writeln!(
            s,
            "Measured {} at commit `{}`{}. Server on CPU(s) `{}`, load generator on CPU(s) `{}`.",
            m.date_utc,
            m.git_commit,
            if m.quick { " (quick mode: shortened runs)" } else { "" },
            m.server_cpus,
            m.load_cpus
        );
        if !m.note.is_empty() {
            let _ = writeln!(s, "\n{}", m.note);
        }
    }
    if let Some(r) = runs.values().next() {
        let h = &r.host;
        let _ = writeln!(
            s,
            "\nHost: {} × {} CPUs, {} GiB, kernel {} (`{}`).",
            h.cpu_model,
            h.cpus_online,
            h.mem_total_kib / (1024 * 1024),
            h.kernel,
            h.hostname
        );
    }

    let _ = writeln!(
        s,
        "\n### Goals of `shared/DESIGN.md` beside the measured figures\n"
    );
    let _ = writeln!(
        s,
        "| goal | target (DESIGN.md) | measured here | beside the echo ceiling | status |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let sat = get("saturation", "delivered_per_s").map(|v| v / cores);
    let tg = runs.get("throughput-goal");
    let tg_rate = tg.and_then(|r| r.get("offered_per_s"));
    let tg_del = tg.and_then(|r| r.get("delivered_per_s")).map(|v| v / cores);
    let tg_ok = tg.map(|r| {
        r.get("drain_complete") != Some(0.0)
            && r.get("delivered_per_s").unwrap_or(0.0)
                >= 0.99 * r.get("offered_per_s").unwrap_or(f64::MAX)
    });
    let _ = writeln!(
        s,
        "| delivered-and-acked 1:1 messages/s per server core, 64 B | ≥ 250,000 (Iris 1.x: ~13,000) | closed loop (saturation): {}; open loop at {}/s offered: {} delivered, p99 {} ms | {} | {} |",
        opt(sat, fmt_num),
        opt(tg_rate, fmt_num),
        opt(tg_del, fmt_num),
        opt(tg.and_then(|r| r.latency).map(|l| l.p99_us), ms),
        opt(sat, ratio),
        match (sat, tg_ok) {
            (_, Some(true)) => "met (sustained open loop)",
            (Some(v), Some(false)) if v >= 250_000.0 => {
                "**met closed loop only**: the open-loop run did not keep up"
            }
            (Some(v), None) if v >= 250_000.0 => "met (closed loop; no open-loop run)",
            (None, None) => "not measured",
            _ => "**not met**",
        }
    );
    let (lat_label, lat_what) = if runs.contains_key("latency-goal") {
        (
            "latency-goal",
            "p99 at half the goal rate (125,000/s) with 10,000 idle connections",
        )
    } else {
        (
            "latency-50",
            "p99 at half the saturation rate with 10,000 idle connections",
        )
    };
    let half = runs.get(lat_label).and_then(|r| r.latency);
    let half_idle = get(lat_label, "idle_connections");
    let half_rate = get(lat_label, "offered_per_s");
    let _ = writeln!(
        s,
        "| {lat_what} | ≤ 1 ms | {} ms at {}/s offered ({}/s delivered), {} idle; sender lag p99 {} ms | — | {} |",
        opt(half.map(|l| l.p99_us), ms),
        opt(half_rate, fmt_num),
        opt(get(lat_label, "delivered_per_s"), fmt_num),
        opt(half_idle, fmt_num),
        opt(
            runs.get(lat_label)
                .and_then(|r| r.sender_lag)
                .map(|l| l.p99_us),
            ms
        ),
        status(half.map(|l| l.p99_us), |v| v <= 1000.0)
    );
    let _ = writeln!(
        s,
        "| p99.9, same run | ≤ 5 ms | {} ms | — | {} |",
        opt(half.map(|l| l.p999_us), ms),
        status(half.map(|l| l.p999_us), |v| v <= 5000.0)
    );
    let mem = get("connect", "server_rss_per_conn_bytes");
    let anon = get("connect", "server_anon_per_conn_bytes");
    let _ = writeln!(
        s,
        "| user-space memory per idle logged-in connection | ≤ 2 KB (2,048 B; Iris 1.x: ~16 KB) | {} B resident ({} B anonymous) over {} connections | — | {} |",
        opt(mem, fmt_num),
        opt(anon, fmt_num),
        opt(get("connect", "connections_open"), fmt_num),
        status(mem, |v| v <= 2048.0)
    );
    let idle_cpu = get("connect", "server_idle_cpu_cores");
    let _ = writeln!(
        s,
        "| edge CPU while holding the idle connections | < 1 % of a core | {} cores over {} s of the hold | — | {} |",
        opt(idle_cpu, |v| format!("{v:.3}")),
        opt(get("connect", "server_idle_secs"), |v| format!("{v:.1}")),
        status(idle_cpu, |v| v < 0.01)
    );
    let logins = get("logins", "logins_per_s");
    let relogin = get("logins-relogin", "logins_per_s");
    let auth = get("logins-auth", "logins_per_s");
    let _ = writeln!(
        s,
        "| logins/s | ≥ 50,000 | {} (TCP connect + LOGIN + close); {} with auth on (HS256 tokens); {} (re-LOGIN on open sockets) | {} | {} |",
        opt(logins, fmt_num),
        opt(auth, fmt_num),
        opt(relogin, fmt_num),
        opt(logins, ratio),
        status(
            match (logins, relogin) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            |v| v >= 50_000.0
        )
    );
    let drain = get("offline", "drain_per_s");
    let _ = writeln!(
        s,
        "| stored-message drain at login | ≥ 500,000 messages/s | {} messages/s ({} messages, {} users) | {} | {} |",
        opt(drain, fmt_num),
        opt(get("offline", "delivered"), fmt_num),
        opt(get("offline", "users"), fmt_num),
        opt(drain, ratio),
        status(drain, |v| v >= 500_000.0)
    );
    let _ = writeln!(
        s,
        "| cluster: cross-edge delivery through the broker | p99 ≤ 20 ms at 10,000 messages/s | measured by `scripts/bench-cluster.sh`, not by this run: see \"Cluster\" below | — | see \"Cluster\" |"
    );

    let _ = writeln!(
        s,
        "\n### Loopback ceiling (reference echo server, same run)\n"
    );
    let _ = writeln!(
        s,
        "One pinned glommio core (`iris-echo`) writing back 64-byte messages; DESIGN.md measured ~66,000 round trips/s with one message per read and ~490,000 messages/s with 8 per read.\n"
    );
    let _ = writeln!(
        s,
        "| run | connections | messages per read | messages/s | round trips/s | round trip p50 / p99 ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for label in ["echo-1", "echo-8"] {
        if let Some(r) = runs.get(label) {
            let l = r.latency.unwrap_or_default();
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} / {} |",
                opt(r.get("conns"), fmt_num),
                opt(r.get("batch"), fmt_num),
                opt(r.get("messages_per_s"), fmt_num),
                opt(r.get("round_trips_per_s"), fmt_num),
                ms(l.p50_us),
                ms(l.p99_us)
            );
        }
    }

    let lat = latency_runs(runs);
    if !lat.is_empty() || runs.contains_key("saturation") {
        let _ = writeln!(
            s,
            "\n### Throughput and latency (`pairs`, 64-byte messages, every message acked)\n"
        );
        let _ = writeln!(
            s,
            "| run | pairs | offered/s | delivered/s | beside the echo ceiling | idle conns | p50 | p90 | p99 | p99.9 | max (ms) | sender lag p99 (ms) | lost | dup | reord | server cores busy |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let mut rows: Vec<(&str, &Report)> = runs
            .iter()
            .filter(|(l, r)| r.scenario == "pairs" && l.starts_with("saturation"))
            .map(|(l, r)| (l.as_str(), r))
            .collect();
        for r in &lat {
            rows.push((r.label.as_deref().unwrap_or("?"), r));
        }
        for (label, r) in rows {
            let l = r.latency.unwrap_or_default();
            let d = r.get("delivered_per_s").unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                opt(r.get("pairs"), fmt_num),
                opt(r.get("offered_per_s"), fmt_num).replace('—', "max"),
                fmt_num(d),
                ratio(d),
                opt(r.get("idle_connections"), fmt_num),
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                opt(r.sender_lag.map(|x| x.p99_us), ms),
                lost_cell(r),
                r.totals.duplicates,
                r.totals.reordered,
                opt(r.server.as_ref().map(|x| x.cpu_cores_busy), |v| format!("{v:.2}"))
            );
        }
        let _ = writeln!(
            s,
            "\n![latency percentiles against offered rate]({chart_dir}/latency.svg)\n\n![delivered messages per second over time]({chart_dir}/throughput.svg)"
        );
    }

    let _ = writeln!(s, "\n### Every run\n");
    let _ = writeln!(
        s,
        "| run | scenario | headline | beside the echo ceiling | errors | server cores busy | load generator cores busy | load avg start → end |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (label, r) in runs {
        let (name, v) = headline(r);
        let _ = writeln!(
            s,
            "| {label} | {} | {name} {} | {} | {} | {} | {:.2} | {:.2} → {:.2} |",
            r.scenario,
            opt(v, fmt_num),
            if r.scenario == "echo" {
                "—".into()
            } else {
                opt(v, ratio)
            },
            r.totals.errors,
            opt(r.server.as_ref().map(|x| x.cpu_cores_busy), |v| format!(
                "{v:.2}"
            )),
            r.loadgen_cores_busy,
            r.host.loadavg_start[0],
            r.host.loadavg_end[0]
        );
    }

    if !micro.is_empty() {
        let _ = writeln!(s, "\n### Micro-benchmarks (criterion, median)\n");
        let _ = writeln!(
            s,
            "| benchmark | per iteration | elements | per element | elements/s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for m in micro {
            let per = m.ns_per_element();
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} |",
                m.id,
                fmt_ns(m.median_ns),
                fmt_num(m.elements),
                fmt_ns(per),
                fmt_num(if per > 0.0 { 1e9 / per } else { 0.0 })
            );
        }
    }

    let _ = writeln!(s, "\n### Commands\n");
    let _ = writeln!(s, "```text");
    for c in meta
        .map(|m| m.server_commands.as_slice())
        .unwrap_or_default()
    {
        let _ = writeln!(s, "# server\n{c}");
    }
    for (label, r) in runs {
        let _ = writeln!(s, "# {label} ({})", r.started_utc);
        let _ = writeln!(s, "{}", r.command.join(" "));
    }
    let _ = writeln!(s, "```");
    s
}

/// Lost messages, or what was still undelivered when the drain wait timed out.
fn lost_cell(r: &Report) -> String {
    if r.get("drain_complete") == Some(0.0) {
        format!("{} undelivered at drain timeout", fmt_num(r.lost as f64))
    } else {
        fmt_num(r.lost as f64)
    }
}

/// The figure that sums up a run.
fn headline(r: &Report) -> (&'static str, Option<f64>) {
    match r.scenario.as_str() {
        "pairs" => ("delivered/s", r.get("delivered_per_s")),
        "connect" => ("connects/s", r.get("connects_per_s")),
        "offline" => ("drain messages/s", r.get("drain_per_s")),
        "logins" => ("logins/s", r.get("logins_per_s")),
        "echo" => ("messages/s", r.get("messages_per_s")),
        _ => ("", None),
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::stats::LatencySummary;

    fn pairs(label: &str, offered: Option<f64>, delivered: f64) -> Report {
        let mut r = Report::new("pairs", vec!["iris-load".into(), "pairs".into()]);
        r.label = Some(label.into());
        if let Some(o) = offered {
            r.figure("offered_per_s", o);
        }
        r.figure("delivered_per_s", delivered);
        r.latency = Some(LatencySummary {
            count: 10,
            min_us: 10.0,
            p50_us: 100.0,
            p90_us: 200.0,
            p99_us: 800.0,
            p999_us: 3000.0,
            max_us: 4000.0,
            ..Default::default()
        });
        r.timeseries = vec![Default::default(); 3];
        r
    }

    #[test]
    fn splice_replaces_or_appends() {
        let g = "TABLE";
        let a = splice("# Title\n\nprose\n", g);
        assert!(a.starts_with("# Title\n\nprose\n\n"));
        assert!(a.contains(&format!("{BEGIN}\nTABLE\n{END}\n")));
        let b = splice(&(a.clone() + "after\n"), "NEW");
        assert!(b.contains("NEW") && !b.contains("TABLE") && b.ends_with("after\n"));
        assert_eq!(b.matches(BEGIN).count(), 1);
    }

    #[test]
    fn renders_goals_ratios_and_charts() {
        let mut runs = BTreeMap::new();
        runs.insert("saturation".into(), pairs("saturation", None, 100_000.0));
        runs.insert(
            "latency-50".into(),
            pairs("latency-50", Some(50_000.0), 50_000.0),
        );
        runs.insert(
            "latency-25".into(),
            pairs("latency-25", Some(25_000.0), 25_000.0),
        );
        let mut e = Report::new("echo", vec![]);
        e.label = Some("echo-8".into());
        e.figure("messages_per_s", 400_000.0);
        runs.insert("echo-8".into(), e);
        let mut c = Report::new("connect", vec![]);
        c.label = Some("connect".into());
        c.figure("server_idle_cpu_cores", 0.004);
        c.figure("server_idle_secs", 5.0);
        runs.insert("connect".into(), c);
        let md = render(&runs, &[], None, "perf/results");
        assert!(md.contains("saturation): 100,000;"), "{md}");
        assert!(
            md.contains("< 1 % of a core | 0.004 cores over 5.0 s of the hold | — | met"),
            "{md}"
        );
        assert!(md.contains("| 0.25× echo 8/read |"), "{md}");
        assert!(md.contains("≤ 1 ms | 0.800 ms at 50,000/s offered"), "{md}");
        assert!(md.contains("not measured"));
        let dir = tempfile::tempdir().unwrap();
        draw_latency(&runs, &dir.path().join("l.svg")).unwrap();
        draw_throughput(&runs, &dir.path().join("t.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("l.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("p99.9"));
        draw_latency(&BTreeMap::new(), &dir.path().join("e.svg")).unwrap();
    }
}
