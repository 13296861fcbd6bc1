//! The instance catalog: instance types with their vCPUs, memory, network, local disk and hourly
//! price, and the type each tier uses by default.
//!
//! The default catalog is `perf/catalog.toml`, compiled in; `iris-plan --catalog FILE` reads
//! another file of the same shape instead.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model::Tier;
use super::PlanError;

/// The catalog shipped with the planner (`perf/catalog.toml`).
pub const DEFAULT_CATALOG: &str = include_str!("../../catalog.toml");

/// One instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Type name, e.g. `c6i.4xlarge`.
    pub name: String,
    /// Family, e.g. `c6i`.
    #[serde(default)]
    pub family: String,
    /// Virtual CPUs.
    pub vcpu: u32,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Sustained (baseline) network bandwidth, Gbit/s.
    pub network_gbps: f64,
    /// Local instance storage, GB (decimal); 0 when EBS only.
    #[serde(default)]
    pub disk_gb: f64,
    /// Sustained write throughput of the local storage, MB/s.
    #[serde(default)]
    pub disk_write_mb_s: f64,
    /// On-demand price, USD per hour.
    pub hourly_usd: f64,
    /// Tiers `--instance TIER=auto` may pick this type for.
    #[serde(default)]
    pub roles: Vec<Tier>,
}

/// The whole catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Billing hours per month.
    #[serde(default = "default_hours")]
    pub hours_per_month: f64,
    /// Default instance type per tier.
    pub tiers: BTreeMap<Tier, String>,
    /// Instance types.
    #[serde(rename = "instance")]
    pub instances: Vec<Instance>,
}

fn default_hours() -> f64 {
    730.0
}

impl Catalog {
    /// Parses and validates a catalog from TOML text.
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        let catalog: Catalog = toml::from_str(text)?;
        catalog.validate()?;
        Ok(catalog)
    }

    /// Reads and validates a catalog file.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| PlanError::File {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    /// The type named `name`.
    pub fn instance(&self, name: &str) -> Result<&Instance, PlanError> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| PlanError::UnknownInstance(name.to_owned()))
    }

    /// The default type of `tier`.
    pub fn tier_default(&self, tier: Tier) -> Result<&str, PlanError> {
        self.tiers
            .get(&tier)
            .map(String::as_str)
            .ok_or(PlanError::NoTierDefault(tier))
    }

    fn validate(&self) -> Result<(), PlanError> {
        let bad = |what: String| Err(PlanError::Catalog(what));
        if !(self.hours_per_month.is_finite() && self.hours_per_month > 0.0) {
            return bad("hours_per_month must be above 0".into());
        }
        if self.instances.is_empty() {
            return bad("no [[instance]] entries".into());
        }
        for (i, inst) in self.instances.iter().enumerate() {
            if self.instances[..i].iter().any(|o| o.name == inst.name) {
                return bad(format!("instance {} listed twice", inst.name));
            }
            let nums = [
                ("memory_gib", inst.memory_gib),
                ("network_gbps", inst.network_gbps),
                ("disk_gb", inst.disk_gb),
                ("disk_write_mb_s", inst.disk_write_mb_s),
                ("hourly_usd", inst.hourly_usd),
            ];
            if let Some((key, _)) = nums.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
                return bad(format!(
                    "instance {}: {key} must be a number of at least 0",
                    inst.name
                ));
            }
            if inst.vcpu == 0 {
                return bad(format!("instance {}: vcpu must be at least 1", inst.name));
            }
        }
        for tier in Tier::ALL {
            let name = self.tier_default(tier)?;
            if self.instance(name).is_err() {
                return bad(format!(
                    "[tiers] {tier} = \"{name}\" is not an [[instance]]"
                ));
            }
        }
        Ok(())
    }
}

impl Default for Catalog {
    fn default() -> Self {
        // The embedded catalog is checked by a unit test; a broken one is a build defect.
        Self::parse(DEFAULT_CATALOG).expect("perf/catalog.toml is a valid catalog")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_parses() {
        let c = Catalog::parse(DEFAULT_CATALOG).unwrap();
        assert_eq!(c.hours_per_month, 730.0);
        assert_eq!(c.instance("c6i.4xlarge").unwrap().hourly_usd, 0.68);
        for tier in Tier::ALL {
            assert!(c.instance(c.tier_default(tier).unwrap()).is_ok());
        }
    }
}
