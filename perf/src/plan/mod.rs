//! `iris-plan`, the capacity planner: turns a workload target and per-node figures into node
//! counts, binding resources and monthly cost for the edge, core, Kafka, ScyllaDB and Redis tiers,
//! per region and globally.
//!
//! - [`model`]: the [`Target`], the per-node [`Figures`] (seed defaults reproduce the design's
//!   planning tables) and the arithmetic ([`plan`]).
//! - [`catalog`]: the instance catalog (`perf/catalog.toml`, compiled in, replaceable).
//! - [`figures`]: measured figures from a figures file, a results JSON or flags.
//! - [`report`]: the design plan, the measured plan and their difference, as text, Markdown or
//!   JSON.
//!
//! The model, every assumption and why each tier binds: `docs/CAPACITY.md`.

pub mod catalog;
pub mod figures;
pub mod model;
pub mod report;

pub use catalog::{Catalog, Instance};
pub use figures::Overrides;
pub use model::{
    plan, Figures, InstanceChoice, Plan, RegionLoad, Resource, RunnerUp, Target, Tier, TierPlan,
};
pub use report::{render, Format, Report};

/// What can go wrong while planning.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A TOML document did not parse.
    #[error("TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A JSON document did not parse or did not fit.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but its content is wrong.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        source: Box<PlanError>,
    },
    /// The catalog is inconsistent.
    #[error("catalog: {0}")]
    Catalog(String),
    /// No `[[instance]]` has this name.
    #[error("unknown instance type {0:?} (not in the catalog)")]
    UnknownInstance(String),
    /// The catalog's `[tiers]` table lacks this tier.
    #[error("catalog: [tiers] has no entry for {0}")]
    NoTierDefault(Tier),
    /// Not a tier name.
    #[error("unknown tier {0:?} (edge, core, kafka, scylla, redis)")]
    UnknownTier(String),
    /// Not a target or figure name.
    #[error("unknown key {0:?} (iris-plan --print-assumptions lists every key)")]
    UnknownKey(String),
    /// A value out of its range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// An instance type offers none of a resource the tier needs.
    #[error("{tier} on {instance}: no usable {resource} per node (after headroom and reserves)")]
    NoCapacity {
        /// The tier.
        tier: Tier,
        /// The resource.
        resource: Resource,
        /// The instance type.
        instance: String,
    },
    /// `--instance TIER=auto` found no catalog type with the tier in its roles that fits.
    #[error("no catalog instance type lists {0} in its roles and fits")]
    NoCandidate(Tier),
}
