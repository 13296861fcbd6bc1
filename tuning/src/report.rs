//! Rendering of check results: the human table `iris-tune check` prints and the JSON document
//! `iris-tune check --json` prints.

use serde::Serialize;

use crate::checks::{Finding, Severity};
use crate::plan::Plan;
use crate::profile::Selection;

/// A full check run, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The root the host was read from.
    pub root: String,
    pub profile: String,
    pub profile_selection: Selection,
    /// Whether any finding is critical (the exit code says the same).
    pub critical: bool,
    pub summary: Summary,
    pub plan: Plan,
    pub findings: Vec<Finding>,
}

/// Findings per severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub info: usize,
    pub warning: usize,
    pub critical: usize,
}

impl Summary {
    pub fn of(findings: &[Finding]) -> Self {
        let mut s = Summary::default();
        for f in findings {
            match f.severity {
                Severity::Ok => s.ok += 1,
                Severity::Info => s.info += 1,
                Severity::Warning => s.warning += 1,
                Severity::Critical => s.critical += 1,
            }
        }
        s
    }
}

impl CheckReport {
    pub fn new(
        root: String,
        profile: String,
        profile_selection: Selection,
        plan: Plan,
        findings: Vec<Finding>,
    ) -> Self {
        let summary = Summary::of(&findings);
        Self {
            root,
            profile,
            profile_selection,
            critical: summary.critical > 0,
            summary,
            plan,
            findings,
        }
    }

    /// The human table: one row per finding; the reason under every row that is not OK (under
    /// every row with `verbose`).
    pub fn table(&self, verbose: bool) -> String {
        let head = ["SEVERITY", "CHECK", "CURRENT", "WANTED"];
        let rows: Vec<[String; 4]> = self
            .findings
            .iter()
            .map(|f| {
                [
                    f.severity.as_str().to_uppercase(),
                    f.name.clone(),
                    f.current.clone(),
                    f.wanted.clone(),
                ]
            })
            .collect();
        let width = |i: usize, cap: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
                .min(cap)
        };
        let w = [width(0, 10), width(1, 32), width(2, 48)];
        let mut out = format!(
            "iris-tune check: root {}, profile {}\n\n",
            self.root, self.profile
        );
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            head[0],
            head[1],
            head[2],
            head[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        ));
        for (row, f) in rows.iter().zip(&self.findings) {
            out.push_str(
                format!(
                    "{:<w0$}  {:<w1$}  {:<w2$}  {}",
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    w0 = w[0],
                    w1 = w[1],
                    w2 = w[2]
                )
                .trim_end(),
            );
            out.push('\n');
            if verbose || f.severity != Severity::Ok {
                out.push_str(&format!("{:w0$}  why: {}\n", "", f.why, w0 = w[0]));
            }
        }
        let s = self.summary;
        out.push_str(&format!(
            "\n{} critical, {} warning, {} info, {} ok\n",
            s.critical, s.warning, s.info, s.ok
        ));
        out
    }
}
