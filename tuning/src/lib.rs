//! `iris-tuning`: host checks and tuning for bare-metal Iris edge nodes (c6i, i3).
//!
//! What an operator runs on a fresh host before starting `iris-edge` (the `iris-tune` binary:
//! `check`, `plan`, `apply`), and what `iris-edge` calls at startup ([`startup_checks`]) to warn
//! about the same things.
//!
//! Layout: [`root`] is the injected filesystem root every read and write goes through (the real
//! `/`, or a fixture tree in tests); [`facts`] reads a host into plain data; [`uring`] probes
//! io_uring live; [`wake`] measures live what a wake-up from idle costs in CPU; [`limits`] holds
//! the rlimit and locked-memory arithmetic; [`profile`] the instance profiles (`profiles.toml`);
//! [`plan`] the shard count and core map; [`checks`] judges facts into [`Finding`]s; [`apply`]
//! turns targets into files and kernel settings; [`report`] renders results. [`Host`] ties them
//! together for one root and profile.

pub mod apply;
pub mod checks;
pub mod error;
pub mod facts;
pub mod limits;
pub mod plan;
pub mod profile;
pub mod report;
pub mod root;
pub mod uring;
pub mod wake;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

pub use checks::{CheckContext, Finding, Severity, Targets};
pub use error::TuningError;
pub use facts::{CollectOptions, HostFacts};
pub use plan::Plan;
pub use profile::{Profile, ProfileSet, Selection};
pub use root::Root;

/// `io_memory_bytes` iris-edge uses unless configured (512 KiB per shard).
pub const DEFAULT_IO_MEMORY_BYTES: usize = 512 << 10;
/// io_uring ring depth iris-edge uses unless configured.
pub const DEFAULT_RING_DEPTH: usize = 128;

/// What `iris-edge` tells [`startup_checks`] about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupContext {
    /// Shards it will start (0 = one per online CPU, the plan's count).
    pub shards: usize,
    /// Locked memory each shard registers for I/O buffers.
    pub io_memory_bytes: usize,
    /// io_uring ring depth per ring.
    pub ring_depth: usize,
}

/// Runs every check against the real `/`, from inside the process that will run the shards:
/// probes io_uring live and judges locked memory with this process's own limit and capabilities.
/// The profile is the one named like the DMI product name, else `generic`. Never panics; what
/// cannot be read is reported as unknown. The wake-up probe is not run here (it would add about
/// 0.15 s to every start), and its finding is left out; `iris-tune check` runs it.
///
/// `iris-edge` logs each non-OK finding once (see [`log_findings`]) and refuses to start on a
/// `Critical` `io_uring` or `memlock` finding.
pub fn startup_checks(ctx: &StartupContext) -> Vec<Finding> {
    let check_ctx = CheckContext {
        shards: (ctx.shards > 0).then_some(ctx.shards),
        shard_cpus: None,
        io_memory_bytes: ctx.io_memory_bytes,
        ring_depth: ctx.ring_depth,
        this_process: true,
    };
    let opened = ProfileSet::builtin().and_then(|profiles| {
        Host::open(
            Root::live(),
            &profiles,
            None,
            CollectOptions {
                probe_uring: true,
                probe_wake: false,
            },
        )
    });
    match opened {
        Ok(host) => {
            let mut findings = host.check(&check_ctx);
            // Not probed here: "not measured" at every start would only be noise.
            findings.retain(|f| f.name != "wakeup");
            findings
        }
        Err(e) => vec![Finding {
            name: "profile".to_owned(),
            current: "unusable".to_owned(),
            wanted: "built-in profiles".to_owned(),
            severity: Severity::Warning,
            why: format!("host checks skipped: {e}"),
        }],
    }
}

/// Logs each finding that is not OK through `tracing` (critical as error, warning as warn,
/// info as info), each distinct finding once per process however often this is called.
pub fn log_findings(findings: &[Finding]) {
    static SEEN: OnceLock<Mutex<HashSet<(String, String)>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for f in findings.iter().filter(|f| f.severity != Severity::Ok) {
        if !seen.insert((f.name.clone(), f.current.clone())) {
            continue;
        }
        match f.severity {
            Severity::Critical => tracing::error!(check = %f.name, current = %f.current,
                wanted = %f.wanted, "host check critical: {}", f.why),
            Severity::Warning => tracing::warn!(check = %f.name, current = %f.current,
                wanted = %f.wanted, "host check warning: {}", f.why),
            _ => tracing::info!(check = %f.name, current = %f.current,
                wanted = %f.wanted, "host check: {}", f.why),
        }
    }
}

/// One host (a root read into facts) under one profile.
#[derive(Debug, Clone)]
pub struct Host {
    pub root: Root,
    pub facts: HostFacts,
    pub profile: Profile,
    pub selection: Selection,
}

impl Host {
    /// Reads `root` and picks the profile (`requested`, else the DMI product name, else
    /// generic).
    pub fn open(
        root: Root,
        profiles: &ProfileSet,
        requested: Option<&str>,
        opts: CollectOptions,
    ) -> Result<Self, TuningError> {
        let facts = HostFacts::collect(&root, opts);
        let (profile, selection) = profiles.select(requested, facts.dmi_product.as_deref())?;
        Ok(Self {
            root,
            facts,
            profile,
            selection,
        })
    }

    /// The shard plan for this host.
    pub fn plan(&self, io_memory_bytes: usize, ring_depth: usize) -> Plan {
        plan::make_plan(&self.facts, &self.profile, io_memory_bytes, ring_depth)
    }

    /// Every check.
    pub fn check(&self, ctx: &CheckContext) -> Vec<Finding> {
        let plan = self.plan(ctx.io_memory_bytes, ctx.ring_depth);
        checks::run_checks(&self.facts, &self.profile, self.selection, &plan, ctx)
    }

    /// The targets `apply` aims for (the plan's shards and core map, default edge settings).
    pub fn targets(&self) -> Targets {
        let plan = self.plan(DEFAULT_IO_MEMORY_BYTES, DEFAULT_RING_DEPTH);
        Targets::new(&self.facts, &plan, &CheckContext::for_plan())
    }

    /// What `apply` would do.
    pub fn actions(&self) -> Vec<apply::Action> {
        apply::actions(&self.facts, &self.profile, &self.targets())
    }
}

impl CheckContext {
    /// The context `iris-tune check` uses without options: the plan's shards and CPUs, default
    /// edge settings, judged for an unprivileged service.
    pub fn for_plan() -> Self {
        Self {
            shards: None,
            shard_cpus: None,
            io_memory_bytes: DEFAULT_IO_MEMORY_BYTES,
            ring_depth: DEFAULT_RING_DEPTH,
            this_process: false,
        }
    }
}

/// The keys of an `iris-edge` config file that matter here (others are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct EdgeSettings {
    pub shards: Option<usize>,
    pub cpus: Option<Vec<usize>>,
    pub io_memory_bytes: Option<usize>,
    pub ring_depth: Option<usize>,
}

impl EdgeSettings {
    /// Reads them from an `iris-edge` TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, TuningError> {
        let err = |message: String| TuningError::EdgeConfig {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}
