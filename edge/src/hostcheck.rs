//! Host checks at startup, shared with `iris-tune check` (crate `iris-tuning`).
//!
//! Every finding that is not OK is logged once, with what it is, what it should be and why.
//! Only the two that make serving impossible stop startup: io_uring unusable, or a memlock limit
//! too low for the configured shards (glommio registers each shard's `io_memory_bytes` and ring
//! memory as locked memory).

use anyhow::bail;
use iris_tuning::{Severity, StartupContext};

use crate::config::EdgeConfig;

/// Runs the startup checks; errors only for what makes serving impossible.
pub fn startup(cfg: &EdgeConfig, shards: usize) -> anyhow::Result<()> {
    let findings = iris_tuning::startup_checks(&StartupContext {
        shards,
        io_memory_bytes: cfg.io_memory_bytes,
        ring_depth: cfg.ring_depth,
    });
    iris_tuning::log_findings(&findings);
    let fatal: Vec<String> = findings
        .iter()
        .filter(|f| {
            f.severity == Severity::Critical && (f.name == "io_uring" || f.name == "memlock")
        })
        .map(|f| {
            format!(
                "{}: is {}, needs {} ({})",
                f.name, f.current, f.wanted, f.why
            )
        })
        .collect();
    if !fatal.is_empty() {
        bail!(
            "this host cannot run {shards} shards: {} — see `iris-tune check` and docs/TUNING.md",
            fatal.join("; ")
        );
    }
    Ok(())
}
