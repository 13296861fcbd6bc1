//! The planner's report: the plan on the seed design's figures, and, when figures were given,
//! the plan on those figures and what changed; rendered as a text table, Markdown or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::catalog::Catalog;
use super::figures::{Overrides, ResultsRead};
use super::model::{plan, Figures, InstanceChoice, Plan, Resource, Target, Tier, TierPlan};
use super::PlanError;

/// One figure the measured plan used in place of the seed's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FigureUse {
    /// Canonical figure name.
    pub key: String,
    /// The seed design's value.
    pub seed: f64,
    /// The value planned with.
    pub measured: f64,
    /// Where it came from.
    pub source: String,
}

/// How one tier changed from the design plan to the measured plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierDelta {
    /// The tier.
    pub tier: Tier,
    /// Nodes per region, design.
    pub design_nodes_per_region: u64,
    /// Nodes per region, measured.
    pub measured_nodes_per_region: u64,
    /// Change in nodes per region.
    pub nodes_per_region: i64,
    /// Change in nodes over all regions.
    pub nodes_global: i64,
    /// Change in monthly price over all regions, USD.
    pub monthly_usd_global: f64,
    /// Binding resource, design.
    pub binding_before: Resource,
    /// Binding resource, measured.
    pub binding_after: Resource,
}

/// The change from the design plan to the measured plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta {
    /// Per tier.
    pub tiers: Vec<TierDelta>,
    /// Change in nodes per region, all tiers.
    pub nodes_per_region: i64,
    /// Change in nodes over all regions.
    pub nodes_global: i64,
    /// Change in monthly price over all regions, USD.
    pub monthly_usd_global: f64,
}

impl Delta {
    /// `after - before`.
    pub fn between(before: &Plan, after: &Plan) -> Self {
        let diff = |a: u64, b: u64| {
            i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX)
        };
        let tiers = before
            .tiers
            .iter()
            .zip(&after.tiers)
            .map(|(b, a)| TierDelta {
                tier: b.tier,
                design_nodes_per_region: b.nodes_per_region,
                measured_nodes_per_region: a.nodes_per_region,
                nodes_per_region: diff(a.nodes_per_region, b.nodes_per_region),
                nodes_global: diff(a.nodes_global, b.nodes_global),
                monthly_usd_global: a.monthly_usd_global - b.monthly_usd_global,
                binding_before: b.binding,
                binding_after: a.binding,
            })
            .collect();
        Self {
            tiers,
            nodes_per_region: diff(after.nodes_per_region, before.nodes_per_region),
            nodes_global: diff(after.nodes_global, before.nodes_global),
            monthly_usd_global: after.monthly_usd_global - before.monthly_usd_global,
        }
    }
}

/// The plan on measured (or otherwise given) figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// The figures that differ from the seed's, with their sources.
    pub figures_used: Vec<FigureUse>,
    /// What each `--results` file gave.
    pub results_read: Vec<ResultsRead>,
    /// The plan.
    pub plan: Plan,
    /// Measured minus design.
    pub delta: Delta,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Hours per month the prices assume.
    pub hours_per_month: f64,
    /// The plan on the seed design's figures.
    pub design: Plan,
    /// The plan on the given figures, when any were given.
    pub measured: Option<Measured>,
}

impl Report {
    /// Plans `target` with the seed `figures`, then, if `overrides` is not empty, with the
    /// overrides laid over them.
    pub fn build(
        target: &Target,
        figures: &Figures,
        catalog: &Catalog,
        choice: &InstanceChoice,
        overrides: &Overrides,
        results_read: Vec<ResultsRead>,
    ) -> Result<Self, PlanError> {
        let design = plan(target, figures, catalog, choice)?;
        let measured = if overrides.is_empty() && results_read.is_empty() {
            None
        } else {
            let measured_figures = overrides.apply(figures)?;
            let p = plan(target, &measured_figures, catalog, choice)?;
            let seed = serde_json::to_value(figures)?;
            let figures_used = overrides
                .values
                .iter()
                .map(|(k, o)| FigureUse {
                    key: k.clone(),
                    seed: seed
                        .get(k)
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(f64::NAN),
                    measured: o.value,
                    source: o.source.clone(),
                })
                .collect();
            let delta = Delta::between(&design, &p);
            Some(Measured {
                figures_used,
                results_read,
                plan: p,
                delta,
            })
        };
        Ok(Self {
            hours_per_month: catalog.hours_per_month,
            design,
            measured,
        })
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned plain-text tables.
    Table,
    /// GitHub Markdown.
    Markdown,
    /// Pretty JSON of [`Report`].
    Json,
}

/// Renders `report` in `format`.
pub fn render(report: &Report, format: Format) -> Result<String, PlanError> {
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(report)? + "\n"),
        Format::Table => Ok(render_doc(report, false)),
        Format::Markdown => Ok(render_doc(report, true)),
    }
}

struct Doc {
    md: bool,
    out: String,
}

impl Doc {
    fn heading(&mut self, text: &str) {
        if self.md {
            let _ = writeln!(self.out, "## {text}\n");
        } else {
            let _ = writeln!(self.out, "{text}\n{}\n", "=".repeat(text.chars().count()));
        }
    }

    fn subheading(&mut self, text: &str) {
        if self.md {
            let _ = writeln!(self.out, "### {text}\n");
        } else {
            let _ = writeln!(self.out, "{text}\n{}\n", "-".repeat(text.chars().count()));
        }
    }

    fn bullets(&mut self, lines: &[String]) {
        for l in lines {
            let _ = writeln!(self.out, "- {l}");
        }
        self.out.push('\n');
    }

    fn para(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}\n");
    }

    /// `right[i]`: column i is right-aligned.
    fn table(&mut self, header: &[&str], right: &[bool], rows: &[Vec<String>]) {
        let n = header.len();
        if self.md {
            let esc = |s: &str| s.replace('|', "\\|");
            let _ = writeln!(
                self.out,
                "| {} |",
                header
                    .iter()
                    .map(|h| esc(h))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let seps: Vec<&str> = (0..n)
                .map(|i| if right[i] { "---:" } else { "---" })
                .collect();
            let _ = writeln!(self.out, "|{}|", seps.join("|"));
            for r in rows {
                let _ = writeln!(
                    self.out,
                    "| {} |",
                    r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
                );
            }
            self.out.push('\n');
            return;
        }
        let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for r in rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                let pad = w[i] - c.chars().count();
                if i > 0 {
                    s.push_str("  ");
                }
                if right[i] {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < n {
                        s.push_str(&" ".repeat(pad));
                    }
                }
            }
            s.trim_end().to_owned()
        };
        let head: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
        let _ = writeln!(self.out, "{}", line(&head));
        let total: usize = w.iter().sum::<usize>() + 2 * (n - 1);
        let _ = writeln!(self.out, "{}", "-".repeat(total));
        for r in rows {
            let _ = writeln!(self.out, "{}", line(r));
        }
        self.out.push('\n');
    }
}

fn render_doc(report: &Report, md: bool) -> String {
    let mut d = Doc {
        md,
        out: String::new(),
    };
    let p = &report.design;
    d.heading("Iris capacity plan: seed design figures");
    d.bullets(&workload_lines(p, report.hours_per_month));
    plan_table(&mut d, p);
    d.subheading("Why each tier binds (per region, nodes each resource needs before rounding up)");
    needs_table(&mut d, p);
    if let Some(m) = &report.measured {
        d.heading("With measured figures");
        for r in &m.results_read {
            let mut line = format!("results file {}: ", r.path);
            if r.used.is_empty() {
                line.push_str("no figures used");
            } else {
                let _ = write!(line, "used {}", r.used.join(", "));
            }
            if let Some(n) = &r.note {
                let _ = write!(line, " ({n})");
            }
            d.para(&line);
        }
        if m.figures_used.is_empty() {
            d.para("No figure differs from the seed design's.");
        } else {
            let rows: Vec<Vec<String>> = m
                .figures_used
                .iter()
                .map(|f| {
                    vec![
                        f.key.clone(),
                        qty(f.seed),
                        qty(f.measured),
                        ratio(f.measured, f.seed),
                        f.source.clone(),
                    ]
                })
                .collect();
            d.table(
                &["figure", "seed", "measured", "x seed", "source"],
                &[false, true, true, true, false],
                &rows,
            );
        }
        plan_table(&mut d, &m.plan);
        d.subheading("Change from the seed design plan");
        delta_table(&mut d, &m.delta);
        d.subheading("Why each tier binds, measured figures (per region)");
        needs_table(&mut d, &m.plan);
    }
    while d.out.ends_with("\n\n") {
        d.out.pop();
    }
    d.out
}

fn workload_lines(p: &Plan, hours: f64) -> Vec<String> {
    let t = &p.target;
    let l = &p.region_load;
    vec![
        format!(
            "{} users over {} regions: {} homed and {} connected per region (concurrency {})",
            qty(t.users),
            t.regions,
            qty(l.homed_users),
            qty(l.connections),
            qty(t.concurrency)
        ),
        format!(
            "{} messages/day of {} B: {}/s average, {}/s peak per region (peak/avg {})",
            qty(t.msgs_per_day),
            qty(t.msg_bytes),
            qty(l.msgs_per_s_avg),
            qty(l.msgs_per_s_peak),
            qty(t.peak_to_avg)
        ),
        format!(
            "peak per region: {} logins/s, {} stored msgs/s drained at login (offline share {}), cross-region share {}",
            qty(l.logins_per_s_peak),
            qty(l.drain_msgs_per_s_peak),
            qty(t.offline_fraction),
            qty(t.cross_region_fraction)
        ),
        format!(
            "headroom {}% (nodes planned to {}% of each ceiling); on-demand prices, {} h/month",
            qty(t.headroom * 100.0),
            qty((1.0 - t.headroom) * 100.0),
            qty(hours)
        ),
    ]
}

fn plan_table(d: &mut Doc, p: &Plan) {
    let mut rows: Vec<Vec<String>> = p
        .tiers
        .iter()
        .map(|t| {
            vec![
                t.tier.to_string(),
                t.instance.clone(),
                int(t.nodes_per_region),
                int(t.nodes_global),
                t.binding.to_string(),
                t.runner_up.as_ref().map_or_else(String::new, |r| {
                    format!("{} ({})", r.resource, int(r.nodes_per_region))
                }),
                usd(t.monthly_usd_per_region),
                usd(t.monthly_usd_global),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        String::new(),
        int(p.nodes_per_region),
        int(p.nodes_global),
        String::new(),
        String::new(),
        usd(p.monthly_usd_per_region),
        usd(p.monthly_usd_global),
    ]);
    d.table(
        &[
            "tier",
            "instance",
            "nodes/region",
            "nodes global",
            "binds",
            "next (nodes/region)",
            "$/month/region",
            "$/month global",
        ],
        &[false, false, true, true, false, false, true, true],
        &rows,
    );
}

fn needs_table(d: &mut Doc, p: &Plan) {
    let mut rows = Vec::new();
    for t in &p.tiers {
        rows.extend(need_rows(t));
    }
    d.table(
        &[
            "tier",
            "resource",
            "demand/region",
            "usable/node",
            "nodes",
            "",
        ],
        &[false, false, true, true, true, false],
        &rows,
    );
}

fn need_rows(t: &TierPlan) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = t
        .needs
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mark = if i == 0 && t.binding == n.resource {
                "<- binds"
            } else {
                ""
            };
            vec![
                if i == 0 {
                    t.tier.to_string()
                } else {
                    String::new()
                },
                n.resource.to_string(),
                format!("{} {}", qty(n.demand), n.unit),
                format!("{} {}", qty(n.usable_per_node), n.unit),
                format!("{:.2}", n.nodes),
                mark.to_owned(),
            ]
        })
        .collect();
    if t.binding == Resource::Replicas {
        rows.push(vec![
            String::new(),
            "replicas".into(),
            String::new(),
            String::new(),
            int(t.min_nodes),
            "<- binds (minimum)".into(),
        ]);
    }
    rows
}

fn delta_table(d: &mut Doc, delta: &Delta) {
    let mut rows: Vec<Vec<String>> = delta
        .tiers
        .iter()
        .map(|t| {
            let binds = if t.binding_before == t.binding_after {
                t.binding_after.to_string()
            } else {
                format!("{} -> {}", t.binding_before, t.binding_after)
            };
            vec![
                t.tier.to_string(),
                format!(
                    "{} -> {}",
                    int(t.design_nodes_per_region),
                    int(t.measured_nodes_per_region)
                ),
                signed(t.nodes_per_region),
                signed(t.nodes_global),
                binds,
                signed_usd(t.monthly_usd_global),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        String::new(),
        signed(delta.nodes_per_region),
        signed(delta.nodes_global),
        String::new(),
        signed_usd(delta.monthly_usd_global),
    ]);
    d.table(
        &[
            "tier",
            "nodes/region",
            "change/region",
            "change global",
            "binds",
            "change $/month global",
        ],
        &[false, true, true, true, false, true],
        &rows,
    );
}

/// Thousands separators: `1234567` → `1,234,567`.
pub fn int(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn signed(v: i64) -> String {
    let s = int(v.unsigned_abs());
    match v.signum() {
        1 => format!("+{s}"),
        -1 => format!("-{s}"),
        _ => "0".into(),
    }
}

/// A quantity: whole with separators from 1,000 up, else up to 2 decimals.
pub fn qty(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    let body = if a >= 999.5 {
        // Far below 2^53 for anything this model handles.
        int(a.round() as u64)
    } else if a >= 100.0 {
        trim(format!("{a:.1}"))
    } else {
        trim(format!("{a:.2}"))
    };
    if v < 0.0 && body != "0" {
        format!("-{body}")
    } else {
        body
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{}x", qty(a / b))
    } else {
        "-".into()
    }
}

/// Whole dollars with separators.
pub fn usd(v: f64) -> String {
    format!("${}", int(v.max(0.0).round() as u64))
}

fn signed_usd(v: f64) -> String {
    let r = v.round();
    if r == 0.0 {
        "$0".into()
    } else if r > 0.0 {
        format!("+{}", usd(r))
    } else {
        format!("-{}", usd(-r))
    }
}
