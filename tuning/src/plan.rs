//! The shard plan: how many shards an edge on this host should run and on which CPUs, and which
//! CPUs stay free of shards for the NIC interrupts and the Kafka producer threads. Rendered as an
//! `iris-edge` config fragment (`shards`, `cpus`) by `iris-tune plan`, and used by `check` (IRQ
//! affinity against the shards' CPUs) and `apply` (where to pin the NIC IRQs).
//!
//! Rule: a host with fewer than four physical cores keeps nothing back (every CPU runs a shard);
//! larger hosts keep one physical core per eight (rounded up, or the profile's
//! `housekeeping_cores`), with all its SMT siblings, on the NIC's NUMA node, lowest core first.
//! Every other logical CPU runs one shard.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::facts::HostFacts;
use crate::limits::{human_bytes, memlock_needed, memlock_per_shard, memlock_target};
use crate::profile::{Profile, Selection};
use crate::root::format_cpulist;

/// A shard count and core map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Shards (glommio executors) to run.
    pub shards: usize,
    /// CPU of each shard, in shard order.
    pub shard_cpus: Vec<usize>,
    /// CPUs the NIC interrupts are pinned to.
    pub irq_cpus: Vec<usize>,
    /// CPUs for the Kafka producer threads (the same housekeeping CPUs).
    pub producer_cpus: Vec<usize>,
    pub kafka_producer_threads: usize,
    pub online_cpus: usize,
    pub physical_cores: usize,
    pub threads_per_core: usize,
    pub numa_nodes: usize,
    /// NUMA node of the primary NIC, when known.
    pub nic_node: Option<usize>,
    /// Sockets the edge is planned to hold.
    pub connections: u64,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    /// Locked memory the shards need (see [`crate::limits`]).
    pub memlock_needed: u64,
    /// The memlock limit `apply` sets.
    pub memlock_target: u64,
    /// Remarks for the operator.
    pub notes: Vec<String>,
}

/// One physical core: its logical CPUs and NUMA node.
struct Core {
    cpus: Vec<usize>,
    node: Option<usize>,
}

/// Plans shards for `facts` under `profile`.
pub fn make_plan(
    facts: &HostFacts,
    profile: &Profile,
    io_memory_bytes: usize,
    ring_depth: usize,
) -> Plan {
    let mut notes = Vec::new();
    let mut by_key: BTreeMap<(i64, i64), Core> = BTreeMap::new();
    for cpu in &facts.cpus {
        let key = cpu.core.unwrap_or((-1, cpu.id as i64));
        let core = by_key.entry(key).or_insert(Core {
            cpus: Vec::new(),
            node: cpu.node,
        });
        core.cpus.push(cpu.id);
    }
    let mut cores: Vec<Core> = by_key.into_values().collect();
    cores.sort_by_key(|c| c.cpus.iter().min().copied());
    let physical = cores.len();
    let threads_per_core = cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1);
    let nic_node = facts
        .nics
        .iter()
        .max_by_key(|n| n.rx_queues)
        .and_then(|n| n.numa_node);

    let reserve = profile
        .housekeeping_cores
        .unwrap_or(if physical < 4 {
            0
        } else {
            physical.div_ceil(8)
        })
        .min(physical.saturating_sub(1));
    let mut order: Vec<&Core> = cores.iter().collect();
    if let Some(node) = nic_node {
        // Stable sort: cores on the NIC's node first, lowest CPU first within each group.
        order.sort_by_key(|c| c.node != Some(node));
    }
    let mut housekeeping: Vec<usize> = order
        .iter()
        .take(reserve)
        .flat_map(|c| c.cpus.iter().copied())
        .collect();
    housekeeping.sort_unstable();

    let node_of = |id: usize| {
        facts
            .cpus
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.node)
            .unwrap_or(0)
    };
    let mut shard_cpus: Vec<usize> = facts
        .cpus
        .iter()
        .map(|c| c.id)
        .filter(|id| !housekeeping.contains(id))
        .collect();
    shard_cpus.sort_by_key(|&id| (node_of(id), id));

    if facts.cpus.is_empty() {
        notes.push("CPU topology unknown: one shard, unpinned".to_owned());
    } else if reserve == 0 {
        notes.push(format!(
            "{physical} physical core(s): too few to keep one back; NIC IRQs and the Kafka \
             producer share the shards' CPUs"
        ));
    }
    if facts.nodes.len() > 1 {
        notes.push(format!(
            "{} NUMA nodes: shards run on all of them; the housekeeping cores are on the NIC's \
             node {}",
            facts.nodes.len(),
            nic_node.map_or("(unknown)".to_owned(), |n| n.to_string())
        ));
    }
    let shards = shard_cpus.len().max(1);
    let needed = memlock_needed(shards, io_memory_bytes, ring_depth);
    Plan {
        shards,
        irq_cpus: housekeeping.clone(),
        producer_cpus: housekeeping,
        shard_cpus,
        kafka_producer_threads: profile.kafka_producer_threads,
        online_cpus: facts.cpus.len(),
        physical_cores: physical,
        threads_per_core,
        numa_nodes: facts.nodes.len().max(1),
        nic_node,
        connections: profile.planned_connections(facts.cpus.len()),
        io_memory_bytes,
        ring_depth,
        memlock_needed: needed,
        memlock_target: memlock_target(needed),
        notes,
    }
}

impl Plan {
    /// The plan as an `iris-edge` config fragment: `shards` and `cpus` lines plus comments.
    pub fn to_edge_toml(&self, profile: &Profile, selection: Selection) -> String {
        let how = match selection {
            Selection::Requested => "requested",
            Selection::Dmi => "from the DMI product name",
            Selection::Generic => "no instance profile matched",
        };
        let kept = if self.irq_cpus.is_empty() {
            "none (too few cores): NIC IRQs and the Kafka producer share the shards' CPUs"
                .to_owned()
        } else {
            format!(
                "{} keep the NIC IRQs (`iris-tune apply` pins them there) and the {} Kafka \
                 producer thread(s)",
                format_cpulist(&self.irq_cpus),
                self.kafka_producer_threads
            )
        };
        let mut out = String::new();
        out.push_str("# iris-edge config fragment written by `iris-tune plan`.\n");
        out.push_str(&format!(
            "# Profile {} ({how}); host: {} CPUs = {} cores x {} thread(s), {} NUMA node(s).\n",
            profile.name,
            self.online_cpus,
            self.physical_cores,
            self.threads_per_core,
            self.numa_nodes
        ));
        out.push_str("#\n");
        out.push_str("# [edge] settings: top-level keys of the iris-edge config file.\n");
        out.push_str(
            "# shards: glommio executors, one per CPU in `cpus`, each with its own SO_REUSEPORT\n",
        );
        out.push_str("#         listener, sockets and slice of presence.\n");
        out.push_str("# cpus:   shard i is pinned to cpus[i].\n");
        out.push_str(&format!("# CPUs kept back: {kept}.\n"));
        out.push_str(&format!(
            "# Locked memory: {} shards x {} (io_memory_bytes {}, ring depth {}) = {};\n",
            self.shards,
            human_bytes(memlock_per_shard(self.io_memory_bytes, self.ring_depth)),
            human_bytes(self.io_memory_bytes as u64),
            self.ring_depth,
            human_bytes(self.memlock_needed)
        ));
        out.push_str(&format!(
            "#         `iris-tune apply` sets LimitMEMLOCK to {}.\n",
            human_bytes(self.memlock_target)
        ));
        out.push_str(&format!(
            "# Planned sockets: {} (profile `connections`).\n",
            self.connections
        ));
        for note in &self.notes {
            out.push_str(&format!("# Note: {note}.\n"));
        }
        out.push_str(&format!("shards = {}\n", self.shards));
        let cpus: Vec<String> = self.shard_cpus.iter().map(|c| c.to_string()).collect();
        out.push_str(&format!("cpus = [{}]\n", cpus.join(", ")));
        out
    }
}
