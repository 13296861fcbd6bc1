//! Host profiles: what a given instance type (c6i, i3 sizes) should look like and what the edge
//! on it is sized for. The built-in set is `tuning/profiles.toml`, compiled in; operators layer
//! their own file on top with `--profiles FILE`.
//!
//! A [`ProfileSet`] holds the raw, partly filled tables; [`ProfileSet::resolve`] lays a profile
//! over `[defaults]` into a complete [`Profile`] that the checks, the plan and `apply` use.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::TuningError;

/// The built-in profiles file.
pub const BUILTIN_PROFILES: &str = include_str!("../profiles.toml");

/// Name of the profile made of `[defaults]` alone.
pub const GENERIC: &str = "generic";

/// One table of a profiles file: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    pub description: Option<String>,
    pub vcpus: Option<usize>,
    pub threads_per_core: Option<usize>,
    pub numa_nodes: Option<usize>,
    pub memory_gib: Option<u64>,
    pub nic_queues: Option<usize>,
    pub nvme: Option<bool>,
    pub connections: Option<u64>,
    pub connections_per_vcpu: Option<u64>,
    pub housekeeping_cores: Option<usize>,
    pub kafka_producer_threads: Option<usize>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub netdev_max_backlog: Option<u64>,
    pub port_range: Option<[u32; 2]>,
    pub min_port_range_width: Option<u32>,
    pub rmem_max: Option<u64>,
    pub wmem_max: Option<u64>,
    pub rmem_default: Option<u64>,
    pub wmem_default: Option<u64>,
    pub tcp_rmem: Option<[u64; 3]>,
    pub tcp_wmem: Option<[u64; 3]>,
    pub tcp_tw_reuse: Option<u64>,
}

macro_rules! overlay {
    ($base:expr, $top:expr; $($field:ident),* $(,)?) => {
        $( if $top.$field.is_some() { $base.$field = $top.$field.clone(); } )*
    };
}

impl ProfileSpec {
    /// Sets every key `top` has.
    fn overlay(&mut self, top: &ProfileSpec) {
        overlay!(self, top; description, vcpus, threads_per_core, numa_nodes, memory_gib,
            nic_queues, nvme, connections, connections_per_vcpu, housekeeping_cores,
            kafka_producer_threads, somaxconn, tcp_max_syn_backlog, netdev_max_backlog,
            port_range, min_port_range_width, rmem_max, wmem_max, rmem_default, wmem_default,
            tcp_rmem, tcp_wmem, tcp_tw_reuse);
    }
}

/// The shape of a profiles file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilesFile {
    #[serde(default)]
    defaults: ProfileSpec,
    #[serde(default)]
    profiles: BTreeMap<String, ProfileSpec>,
}

/// A complete profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Expected logical CPUs; `None` for the generic profile (take the host's).
    pub vcpus: Option<usize>,
    pub threads_per_core: Option<usize>,
    pub numa_nodes: Option<usize>,
    pub memory_gib: Option<u64>,
    pub nic_queues: Option<usize>,
    pub nvme: bool,
    /// Planned sockets; `None` means `connections_per_vcpu` × the host's CPUs.
    pub connections: Option<u64>,
    pub connections_per_vcpu: u64,
    pub housekeeping_cores: Option<usize>,
    pub kafka_producer_threads: usize,
    pub somaxconn: u64,
    pub tcp_max_syn_backlog: u64,
    pub netdev_max_backlog: u64,
    pub port_range: [u32; 2],
    pub min_port_range_width: u32,
    pub rmem_max: u64,
    pub wmem_max: u64,
    pub rmem_default: u64,
    pub wmem_default: u64,
    pub tcp_rmem: [u64; 3],
    pub tcp_wmem: [u64; 3],
    pub tcp_tw_reuse: u64,
}

impl Profile {
    /// Sockets one edge on this host is planned to hold, given the host's online CPU count.
    pub fn planned_connections(&self, host_cpus: usize) -> u64 {
        self.connections.unwrap_or_else(|| {
            self.connections_per_vcpu
                .saturating_mul(self.vcpus.unwrap_or(host_cpus).max(1) as u64)
        })
    }
}

/// How the profile in use was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// `--profile NAME`.
    Requested,
    /// The host's DMI product name matched a profile name.
    Dmi,
    /// Nothing matched: `[defaults]` sized from the host.
    Generic,
}

/// Profiles: `[defaults]` plus named profiles.
#[derive(Debug, Clone)]
pub struct ProfileSet {
    defaults: ProfileSpec,
    profiles: BTreeMap<String, ProfileSpec>,
}

impl ProfileSet {
    /// The compiled-in `profiles.toml`.
    pub fn builtin() -> Result<Self, TuningError> {
        Self::parse(BUILTIN_PROFILES, "built-in profiles.toml")
    }

    /// The built-in set with `extra` (an operator's file) layered on top.
    pub fn load(extra: Option<&Path>) -> Result<Self, TuningError> {
        let mut set = Self::builtin()?;
        if let Some(path) = extra {
            let text =
                std::fs::read_to_string(path).map_err(|source| TuningError::ProfilesRead {
                    path: path.to_path_buf(),
                    source,
                })?;
            set.extend(Self::parse(&text, &path.display().to_string())?);
        }
        Ok(set)
    }

    /// Parses a profiles file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, TuningError> {
        let file: ProfilesFile = toml::from_str(text).map_err(|e| TuningError::ProfilesParse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        if file.profiles.contains_key(GENERIC) {
            return Err(TuningError::ProfilesParse {
                origin: origin.to_owned(),
                message: format!("\"{GENERIC}\" is reserved for [defaults]"),
            });
        }
        Ok(Self {
            defaults: file.defaults,
            profiles: file.profiles,
        })
    }

    /// Layers `top` over this set, key by key.
    pub fn extend(&mut self, top: ProfileSet) {
        self.defaults.overlay(&top.defaults);
        for (name, spec) in top.profiles {
            self.profiles.entry(name).or_default().overlay(&spec);
        }
    }

    /// Profile names, sorted, `generic` first.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(GENERIC.to_owned())
            .chain(self.profiles.keys().cloned())
            .collect()
    }

    /// The complete profile `name` (`generic` is `[defaults]` alone).
    pub fn resolve(&self, name: &str) -> Result<Profile, TuningError> {
        let mut spec = self.defaults.clone();
        if name != GENERIC {
            let top = self
                .profiles
                .get(name)
                .ok_or_else(|| TuningError::UnknownProfile {
                    name: name.to_owned(),
                    known: self.names().join(", "),
                })?;
            spec.overlay(top);
        }
        let missing = |field: &str| TuningError::ProfilesParse {
            origin: format!("profile {name:?}"),
            message: format!("no value for `{field}` (set it in [defaults])"),
        };
        macro_rules! need {
            ($f:ident) => {
                spec.$f.clone().ok_or_else(|| missing(stringify!($f)))?
            };
        }
        Ok(Profile {
            name: name.to_owned(),
            description: spec.description.clone().unwrap_or_default(),
            vcpus: spec.vcpus,
            threads_per_core: spec.threads_per_core,
            numa_nodes: spec.numa_nodes,
            memory_gib: spec.memory_gib,
            nic_queues: spec.nic_queues,
            nvme: spec.nvme.unwrap_or(false),
            connections: spec.connections,
            connections_per_vcpu: need!(connections_per_vcpu),
            housekeeping_cores: spec.housekeeping_cores,
            kafka_producer_threads: need!(kafka_producer_threads),
            somaxconn: need!(somaxconn),
            tcp_max_syn_backlog: need!(tcp_max_syn_backlog),
            netdev_max_backlog: need!(netdev_max_backlog),
            port_range: need!(port_range),
            min_port_range_width: need!(min_port_range_width),
            rmem_max: need!(rmem_max),
            wmem_max: need!(wmem_max),
            rmem_default: need!(rmem_default),
            wmem_default: need!(wmem_default),
            tcp_rmem: need!(tcp_rmem),
            tcp_wmem: need!(tcp_wmem),
            tcp_tw_reuse: need!(tcp_tw_reuse),
        })
    }

    /// The profile to use: `requested` if given, else the one named like the DMI product name,
    /// else `generic`.
    pub fn select(
        &self,
        requested: Option<&str>,
        dmi_product: Option<&str>,
    ) -> Result<(Profile, Selection), TuningError> {
        if let Some(name) = requested {
            return Ok((self.resolve(name)?, Selection::Requested));
        }
        if let Some(dmi) = dmi_product.map(str::trim) {
            if self.profiles.contains_key(dmi) {
                return Ok((self.resolve(dmi)?, Selection::Dmi));
            }
        }
        Ok((self.resolve(GENERIC)?, Selection::Generic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_resolve() {
        let set = ProfileSet::builtin().unwrap();
        for name in set.names() {
            let p = set.resolve(&name).unwrap();
            assert_eq!(p.name, name);
            assert!(p.planned_connections(2) > 0);
        }
        for name in ["c6i.2xlarge", "c6i.4xlarge", "i3.4xlarge"] {
            assert!(set.names().contains(&name.to_owned()), "{name}");
        }
        let i3 = set.resolve("i3.4xlarge").unwrap();
        assert!(i3.nvme);
        assert_eq!(i3.vcpus, Some(16));
        assert!(!set.resolve("c6i.4xlarge").unwrap().nvme);
    }

    #[test]
    fn operator_file_extends_and_overrides() {
        let mut set = ProfileSet::builtin().unwrap();
        let extra = ProfileSet::parse(
            r#"
            [defaults]
            somaxconn = 131072
            [profiles."c6i.4xlarge"]
            connections = 700000
            [profiles."m7i.large"]
            vcpus = 2
            "#,
            "extra",
        )
        .unwrap();
        set.extend(extra);
        let c6i = set.resolve("c6i.4xlarge").unwrap();
        assert_eq!(c6i.connections, Some(700_000));
        assert_eq!(c6i.vcpus, Some(16));
        assert_eq!(c6i.somaxconn, 131_072);
        assert_eq!(set.resolve("m7i.large").unwrap().vcpus, Some(2));
    }

    #[test]
    fn errors_are_classified() {
        let set = ProfileSet::builtin().unwrap();
        assert!(matches!(
            set.resolve("c6i.nano"),
            Err(TuningError::UnknownProfile { .. })
        ));
        assert!(matches!(
            ProfileSet::parse("[profiles.x]\nvcpu = 3\n", "t"),
            Err(TuningError::ProfilesParse { .. })
        ));
        assert!(matches!(
            ProfileSet::parse("[profiles.generic]\n", "t"),
            Err(TuningError::ProfilesParse { .. })
        ));
        let bare = ProfileSet::parse("[profiles.x]\nvcpus = 3\n", "t").unwrap();
        assert!(matches!(
            bare.resolve("x"),
            Err(TuningError::ProfilesParse { .. })
        ));
    }

    #[test]
    fn selection_order() {
        let set = ProfileSet::builtin().unwrap();
        let (p, how) = set.select(None, Some("c6i.4xlarge\n")).unwrap();
        assert_eq!((p.name.as_str(), how), ("c6i.4xlarge", Selection::Dmi));
        let (p, how) = set.select(None, Some("HVM domU")).unwrap();
        assert_eq!((p.name.as_str(), how), (GENERIC, Selection::Generic));
        let (p, how) = set.select(Some("i3.4xlarge"), Some("c6i.4xlarge")).unwrap();
        assert_eq!((p.name.as_str(), how), ("i3.4xlarge", Selection::Requested));
        assert_eq!(p.planned_connections(2), 600_000);
        let generic = set.resolve(GENERIC).unwrap();
        assert_eq!(generic.planned_connections(2), 75_000);
    }
}
