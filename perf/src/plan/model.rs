//! The capacity model: a workload [`Target`], per-node [`Figures`] and an instance
//! [`Catalog`] in, node counts per tier out.
//!
//! Every region is sized alike (users are spread evenly over the regions), so the global plan is
//! the regional plan times the number of regions. For each tier the model computes, per region,
//! the demand on every resource it tracks (connections, CPU, memory, network, disk, disk I/O) and
//! what one node of the tier's instance type offers of it after headroom; the tier needs
//! `max(ceil(demand / usable per node))` nodes, never fewer than its replication factor, and the
//! resource that sets that maximum is the one that *binds* the tier. The formulas are written
//! out, with the reason for each default, in `docs/CAPACITY.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Instance};
use super::PlanError;

/// Seconds in a day.
pub const SECONDS_PER_DAY: f64 = 86_400.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The workload to plan for. Defaults are the seed design's own assumptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Target {
    /// Registered users, all regions together.
    pub users: f64,
    /// Regions; users are homed evenly over them.
    pub regions: u32,
    /// Messages sent per day, all regions together.
    pub msgs_per_day: f64,
    /// Payload bytes per message.
    pub msg_bytes: f64,
    /// Peak-hour rate over the daily average rate (messages and logins).
    pub peak_to_avg: f64,
    /// Share of every resource kept free (failover, growth, hot spots): nodes are planned to
    /// `1 - headroom` of their ceiling.
    pub headroom: f64,
    /// Share of a region's homed users connected at the peak.
    pub concurrency: f64,
    /// Logins (new sessions) per user per day.
    pub logins_per_user_per_day: f64,
    /// Share of messages whose recipient is offline when sent: stored, then drained at login.
    pub offline_fraction: f64,
    /// Share of messages whose recipient is homed in another region.
    pub cross_region_fraction: f64,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            users: 1e9,
            regions: 50,
            msgs_per_day: 5e11,
            msg_bytes: 100.0,
            peak_to_avg: 3.0,
            headroom: 0.2,
            concurrency: 0.5,
            logins_per_user_per_day: 8.0,
            offline_fraction: 0.2,
            cross_region_fraction: 0.1,
        }
    }
}

impl Target {
    /// Checks every field is in its range.
    pub fn validate(&self) -> Result<(), PlanError> {
        positive("users", self.users)?;
        if self.regions == 0 {
            return Err(invalid("regions", "must be at least 1"));
        }
        non_negative("msgs_per_day", self.msgs_per_day)?;
        non_negative("msg_bytes", self.msg_bytes)?;
        if !(self.peak_to_avg.is_finite() && self.peak_to_avg >= 1.0) {
            return Err(invalid("peak_to_avg", "must be at least 1"));
        }
        if !(self.headroom.is_finite() && (0.0..1.0).contains(&self.headroom)) {
            return Err(invalid("headroom", "must be in [0, 1)"));
        }
        fraction("concurrency", self.concurrency)?;
        non_negative("logins_per_user_per_day", self.logins_per_user_per_day)?;
        fraction("offline_fraction", self.offline_fraction)?;
        fraction("cross_region_fraction", self.cross_region_fraction)?;
        Ok(())
    }
}

/// Per-node capability figures and per-tier constants. Defaults are the seed design's
/// (Iris 1.x era) figures; measured figures replace some of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Figures {
    // --- edge ---
    /// Connections one edge node can hold (its ceiling, before headroom).
    pub edge_conns_per_node: f64,
    /// User-space bytes per idle logged-in connection.
    pub edge_bytes_per_idle_conn: f64,
    /// Kernel bytes per idle TCP connection (socket, file, epoll/io_uring state).
    pub edge_kernel_bytes_per_conn: f64,
    /// Memory an edge node needs before its first connection (OS, runtime, shard buffers), GiB.
    pub edge_base_memory_gib: f64,
    /// Messages accepted, delivered and acked per second per edge core (vCPU).
    pub edge_msgs_per_core_per_s: f64,
    /// Logins per second per edge core.
    pub logins_per_s_per_core: f64,
    /// Stored messages drained to a client at login per second per edge core.
    pub drain_msgs_per_s: f64,
    /// Framing and TCP/IP bytes added to each message on each network hop.
    pub wire_overhead_bytes: f64,
    // --- core ---
    /// Messages per second per core vCPU (consume, store, session lookup, route, ack).
    pub core_msgs_per_s_per_vcpu: f64,
    /// Stored messages read back and sent at login, per second per core vCPU.
    pub core_drain_msgs_per_s_per_vcpu: f64,
    // --- kafka ---
    /// Bytes a Kafka record adds to the message (rkyv frame header, record header, batch share).
    pub kafka_record_overhead_bytes: f64,
    /// Bytes of an ack or receipt record.
    pub ack_bytes: f64,
    /// Kafka replication factor (also the tier's minimum size).
    pub kafka_replication: f64,
    /// Hours Kafka keeps records (replay window after a core failure).
    pub kafka_retention_hours: f64,
    /// Replica records (leader and follower writes) per second per broker vCPU.
    pub kafka_records_per_s_per_vcpu: f64,
    // --- scylla ---
    /// Bytes a stored message row adds to the payload (keys, ids, flags, timestamps).
    pub scylla_row_overhead_bytes: f64,
    /// Stored size over raw size after compression.
    pub scylla_compression: f64,
    /// ScyllaDB replication factor (also the tier's minimum size).
    pub scylla_replication: f64,
    /// Days a message is kept (delivered or not).
    pub scylla_retention_days: f64,
    /// Share of each disk kept free for compaction (size-tiered compaction needs half).
    pub scylla_compaction_free: f64,
    /// Replica operations (writes and drain reads) per second per ScyllaDB vCPU.
    pub scylla_ops_per_s_per_vcpu: f64,
    // --- redis ---
    /// Redis operations per second per node (Redis executes commands on one thread).
    pub redis_ops_per_s_per_node: f64,
    /// Redis operations per message (the core's session lookup).
    pub redis_ops_per_msg: f64,
    /// Redis operations per login (session write, presence, session delete at logout).
    pub redis_ops_per_login: f64,
    /// Bytes of one session in Redis, overhead included.
    pub redis_bytes_per_session: f64,
    /// Redis copies of each session (primary and replicas; also the tier's minimum size).
    pub redis_replication: f64,
    /// Share of memory kept free for the persistence fork's copy-on-write.
    pub redis_fork_reserve: f64,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            edge_conns_per_node: 125_000.0,
            edge_bytes_per_idle_conn: 16_384.0,
            edge_kernel_bytes_per_conn: 4_096.0,
            edge_base_memory_gib: 2.0,
            edge_msgs_per_core_per_s: 13_000.0,
            logins_per_s_per_core: 2_000.0,
            drain_msgs_per_s: 20_000.0,
            wire_overhead_bytes: 64.0,
            core_msgs_per_s_per_vcpu: 1_400.0,
            core_drain_msgs_per_s_per_vcpu: 14_000.0,
            kafka_record_overhead_bytes: 70.0,
            ack_bytes: 40.0,
            kafka_replication: 3.0,
            kafka_retention_hours: 24.0,
            kafka_records_per_s_per_vcpu: 100_000.0,
            scylla_row_overhead_bytes: 60.0,
            scylla_compression: 0.5,
            scylla_replication: 3.0,
            scylla_retention_days: 7.0,
            scylla_compaction_free: 0.5,
            scylla_ops_per_s_per_vcpu: 20_000.0,
            redis_ops_per_s_per_node: 250_000.0,
            redis_ops_per_msg: 1.0,
            redis_ops_per_login: 3.0,
            redis_bytes_per_session: 400.0,
            redis_replication: 2.0,
            redis_fork_reserve: 0.5,
        }
    }
}

impl Figures {
    /// Checks every figure is in its range.
    pub fn validate(&self) -> Result<(), PlanError> {
        positive("edge_conns_per_node", self.edge_conns_per_node)?;
        positive("edge_bytes_per_idle_conn", self.edge_bytes_per_idle_conn)?;
        non_negative(
            "edge_kernel_bytes_per_conn",
            self.edge_kernel_bytes_per_conn,
        )?;
        non_negative("edge_base_memory_gib", self.edge_base_memory_gib)?;
        positive("edge_msgs_per_core_per_s", self.edge_msgs_per_core_per_s)?;
        positive("logins_per_s_per_core", self.logins_per_s_per_core)?;
        positive("drain_msgs_per_s", self.drain_msgs_per_s)?;
        non_negative("wire_overhead_bytes", self.wire_overhead_bytes)?;
        positive("core_msgs_per_s_per_vcpu", self.core_msgs_per_s_per_vcpu)?;
        positive(
            "core_drain_msgs_per_s_per_vcpu",
            self.core_drain_msgs_per_s_per_vcpu,
        )?;
        non_negative(
            "kafka_record_overhead_bytes",
            self.kafka_record_overhead_bytes,
        )?;
        non_negative("ack_bytes", self.ack_bytes)?;
        replication("kafka_replication", self.kafka_replication)?;
        non_negative("kafka_retention_hours", self.kafka_retention_hours)?;
        positive(
            "kafka_records_per_s_per_vcpu",
            self.kafka_records_per_s_per_vcpu,
        )?;
        non_negative("scylla_row_overhead_bytes", self.scylla_row_overhead_bytes)?;
        positive("scylla_compression", self.scylla_compression)?;
        replication("scylla_replication", self.scylla_replication)?;
        non_negative("scylla_retention_days", self.scylla_retention_days)?;
        if !(self.scylla_compaction_free.is_finite()
            && (0.0..1.0).contains(&self.scylla_compaction_free))
        {
            return Err(invalid("scylla_compaction_free", "must be in [0, 1)"));
        }
        positive("scylla_ops_per_s_per_vcpu", self.scylla_ops_per_s_per_vcpu)?;
        positive("redis_ops_per_s_per_node", self.redis_ops_per_s_per_node)?;
        non_negative("redis_ops_per_msg", self.redis_ops_per_msg)?;
        non_negative("redis_ops_per_login", self.redis_ops_per_login)?;
        non_negative("redis_bytes_per_session", self.redis_bytes_per_session)?;
        replication("redis_replication", self.redis_replication)?;
        if !(self.redis_fork_reserve.is_finite() && (0.0..1.0).contains(&self.redis_fork_reserve)) {
            return Err(invalid("redis_fork_reserve", "must be in [0, 1)"));
        }
        Ok(())
    }
}

fn invalid(key: &str, reason: &str) -> PlanError {
    PlanError::Invalid {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

fn positive(key: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(key, "must be a number above 0"))
    }
}

fn non_negative(key: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(invalid(key, "must be a number of at least 0"))
    }
}

fn fraction(key: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, "must be in [0, 1]"))
    }
}

fn replication(key: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v >= 1.0 && v.fract() == 0.0 {
        Ok(())
    } else {
        Err(invalid(key, "must be a whole number of at least 1"))
    }
}

/// A tier of the cluster deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// `iris-edge`: client connections.
    Edge,
    /// `iris-core`: store, sessions, routing.
    Core,
    /// The regional Kafka (or Kafka-API) brokers.
    Kafka,
    /// The ScyllaDB message store.
    Scylla,
    /// Redis sessions.
    Redis,
}

impl Tier {
    /// Every tier, in the order reports list them.
    pub const ALL: [Tier; 5] = [
        Tier::Edge,
        Tier::Core,
        Tier::Kafka,
        Tier::Scylla,
        Tier::Redis,
    ];

    /// Lower-case name, as in the catalog's `[tiers]` table and in `--instance`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Core => "core",
            Tier::Kafka => "kafka",
            Tier::Scylla => "scylla",
            Tier::Redis => "redis",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tier {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| PlanError::UnknownTier(s.to_owned()))
    }
}

/// A resource that can bind a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Connections held (the edge's per-node ceiling).
    Connections,
    /// Processor time.
    Cpu,
    /// Memory.
    Memory,
    /// Network bandwidth.
    Network,
    /// Disk capacity.
    Disk,
    /// Disk write throughput.
    DiskIo,
    /// Not a resource: the tier is at its minimum size, its replication factor.
    Replicas,
}

impl Resource {
    /// Name as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Connections => "connections",
            Resource::Cpu => "CPU",
            Resource::Memory => "memory",
            Resource::Network => "network",
            Resource::Disk => "disk",
            Resource::DiskIo => "disk I/O",
            Resource::Replicas => "replicas",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The load one region carries at its peak (and on average where storage needs it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionLoad {
    /// Users homed to the region: `users / regions`.
    pub homed_users: f64,
    /// Connections at the peak: `homed_users × concurrency`.
    pub connections: f64,
    /// Average messages per second: `msgs_per_day / 86 400 / regions`.
    pub msgs_per_s_avg: f64,
    /// Peak messages per second: `msgs_per_s_avg × peak_to_avg`.
    pub msgs_per_s_peak: f64,
    /// Peak logins per second: `homed_users × logins_per_user_per_day / 86 400 × peak_to_avg`.
    pub logins_per_s_peak: f64,
    /// Peak stored messages drained at login per second: `msgs_per_s_peak × offline_fraction`.
    pub drain_msgs_per_s_peak: f64,
}

impl RegionLoad {
    /// The load of one region of `target`.
    pub fn of(target: &Target) -> Self {
        let regions = f64::from(target.regions);
        let homed_users = target.users / regions;
        let msgs_per_s_avg = target.msgs_per_day / SECONDS_PER_DAY / regions;
        let msgs_per_s_peak = msgs_per_s_avg * target.peak_to_avg;
        Self {
            homed_users,
            connections: homed_users * target.concurrency,
            msgs_per_s_avg,
            msgs_per_s_peak,
            logins_per_s_peak: homed_users * target.logins_per_user_per_day / SECONDS_PER_DAY
                * target.peak_to_avg,
            drain_msgs_per_s_peak: msgs_per_s_peak * target.offline_fraction,
        }
    }
}

/// One resource's demand on one tier of one region, and what one node offers of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Need {
    /// The resource.
    pub resource: Resource,
    /// Unit of `demand` and `usable_per_node` (`conns`, `vCPU`, `GiB`, `Gbit/s`, `TB`, `MB/s`,
    /// `ops/s`).
    pub unit: String,
    /// Demand of the whole region.
    pub demand: f64,
    /// What one node offers, after headroom (and any other reserve).
    pub usable_per_node: f64,
    /// `demand / usable_per_node`, before rounding up.
    pub nodes: f64,
}

impl Need {
    fn new(resource: Resource, unit: &str, demand: f64, usable_per_node: f64) -> Self {
        Self {
            resource,
            unit: unit.to_owned(),
            demand,
            usable_per_node,
            nodes: demand / usable_per_node,
        }
    }
}

/// The plan of one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierPlan {
    /// The tier.
    pub tier: Tier,
    /// Instance type.
    pub instance: String,
    /// Nodes per region.
    pub nodes_per_region: u64,
    /// Nodes over all regions.
    pub nodes_global: u64,
    /// The resource that sets the node count.
    pub binding: Resource,
    /// The tier's minimum size (its replication factor; 1 for stateless tiers).
    pub min_nodes: u64,
    /// What would bind next, and at how many nodes, if the binding resource were lifted.
    pub runner_up: Option<RunnerUp>,
    /// Every resource the model tracks for this tier, binding one first.
    pub needs: Vec<Need>,
    /// Price of one node per month, USD.
    pub monthly_usd_per_node: f64,
    /// Price of the tier in one region per month, USD.
    pub monthly_usd_per_region: f64,
    /// Price of the tier over all regions per month, USD.
    pub monthly_usd_global: f64,
}

/// The constraint behind the binding one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerUp {
    /// The resource (`replicas` when the minimum size would take over).
    pub resource: Resource,
    /// Nodes per region it needs.
    pub nodes_per_region: u64,
}

/// A whole plan: every tier of one region, and the totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The workload planned for.
    pub target: Target,
    /// The figures planned with.
    pub figures: Figures,
    /// The load of one region.
    pub region_load: RegionLoad,
    /// Tiers in [`Tier::ALL`] order.
    pub tiers: Vec<TierPlan>,
    /// Nodes per region, all tiers.
    pub nodes_per_region: u64,
    /// Nodes over all regions, all tiers.
    pub nodes_global: u64,
    /// Monthly price of one region, USD.
    pub monthly_usd_per_region: f64,
    /// Monthly price of all regions, USD.
    pub monthly_usd_global: f64,
}

impl Plan {
    /// The plan of `tier`.
    pub fn tier(&self, tier: Tier) -> &TierPlan {
        // `plan` builds one entry per tier, in `Tier::ALL` order.
        &self.tiers[Tier::ALL.iter().position(|t| *t == tier).unwrap_or(0)]
    }
}

/// Which instance type each tier uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceChoice {
    /// Per tier: `Some(name)` a fixed type, `None` the cheapest type whose roles include the
    /// tier. A tier absent from the map takes the catalog's `[tiers]` entry.
    pub tiers: BTreeMap<Tier, Option<String>>,
}

impl InstanceChoice {
    /// Sets `tier` to `name`, or to the cheapest fitting type if `name` is `auto`.
    pub fn set(&mut self, tier: Tier, name: &str) {
        let choice = if name.eq_ignore_ascii_case("auto") {
            None
        } else {
            Some(name.to_owned())
        };
        self.tiers.insert(tier, choice);
    }
}

/// Rounds a fractional node count up, forgiving floating-point noise of a few parts in 10⁹
/// (`10 M / 100 k` must be 100 nodes, not 101).
pub fn ceil_nodes(nodes: f64) -> u64 {
    if !nodes.is_finite() || nodes <= 0.0 {
        return 0;
    }
    let eps = 1e-9 * nodes.max(1.0);
    // Node counts are far below 2^53: the cast is exact.
    (nodes - eps).ceil().max(0.0) as u64
}

/// Per-region demand and usable per-node capacity of every resource `tier` tracks, on `inst`.
pub fn needs(
    tier: Tier,
    target: &Target,
    figures: &Figures,
    inst: &Instance,
) -> Result<Vec<Need>, PlanError> {
    let f = figures;
    let load = RegionLoad::of(target);
    let u = 1.0 - target.headroom;
    let vcpu = f64::from(inst.vcpu) * u;
    let net = inst.network_gbps * u;
    let m = load.msgs_per_s_peak;
    let d = load.drain_msgs_per_s_peak;
    let x = target.cross_region_fraction;
    let wire = target.msg_bytes + f.wire_overhead_bytes;
    let record = target.msg_bytes + f.kafka_record_overhead_bytes;
    let row = target.msg_bytes + f.scylla_row_overhead_bytes;
    let gbits = |bytes_per_s: f64| bytes_per_s * 8.0 / 1e9;
    let mut out = Vec::new();
    match tier {
        Tier::Edge => {
            out.push(Need::new(
                Resource::Connections,
                "conns",
                load.connections,
                f.edge_conns_per_node * u,
            ));
            let cores = m / f.edge_msgs_per_core_per_s
                + load.logins_per_s_peak / f.logins_per_s_per_core
                + d / f.drain_msgs_per_s;
            out.push(Need::new(Resource::Cpu, "vCPU", cores, vcpu));
            let usable_gib = inst.memory_gib * u - f.edge_base_memory_gib;
            let conn_gib = load.connections
                * (f.edge_bytes_per_idle_conn + f.edge_kernel_bytes_per_conn)
                / GIB;
            out.push(Need::new(Resource::Memory, "GiB", conn_gib, usable_gib));
            // Client in, produce to the core, inbox consume, client out.
            out.push(Need::new(
                Resource::Network,
                "Gbit/s",
                gbits(m * wire * 4.0),
                net,
            ));
        }
        Tier::Core => {
            let cores = m / f.core_msgs_per_s_per_vcpu + d / f.core_drain_msgs_per_s_per_vcpu;
            out.push(Need::new(Resource::Cpu, "vCPU", cores, vcpu));
            // Consume, write to the store, produce to the inbox; drained messages read back.
            out.push(Need::new(
                Resource::Network,
                "Gbit/s",
                gbits(m * record * 3.0 + d * row),
                net,
            ));
        }
        Tier::Kafka => {
            let rf = f.kafka_replication;
            // Message records: deliver topic + edge inbox + one global-topic hop when cross-region.
            let msg_records = 2.0 + x;
            // Ack records: to the core + one global-topic hop when cross-region.
            let ack_records = 1.0 + x;
            let bytes_per_msg = msg_records * record + ack_records * f.ack_bytes;
            let cores = m * (msg_records + ack_records) * rf / f.kafka_records_per_s_per_vcpu;
            out.push(Need::new(Resource::Cpu, "vCPU", cores, vcpu));
            let retained_tb =
                load.msgs_per_s_avg * bytes_per_msg * rf * f.kafka_retention_hours * 3600.0 / 1e12;
            out.push(Need::new(
                Resource::Disk,
                "TB",
                retained_tb,
                inst.disk_gb / 1000.0 * u,
            ));
            out.push(Need::new(
                Resource::DiskIo,
                "MB/s",
                m * bytes_per_msg * rf / 1e6,
                inst.disk_write_mb_s * u,
            ));
            // Each byte enters a broker RF times (produce + follower fetches) and leaves RF times
            // (follower fetches + the consumer).
            out.push(Need::new(
                Resource::Network,
                "Gbit/s",
                gbits(m * bytes_per_msg * rf),
                net,
            ));
        }
        Tier::Scylla => {
            let rf = f.scylla_replication;
            let stored_tb = load.msgs_per_s_avg
                * SECONDS_PER_DAY
                * f.scylla_retention_days
                * row
                * f.scylla_compression
                * rf
                / 1e12;
            let usable_tb = inst.disk_gb / 1000.0 * u * (1.0 - f.scylla_compaction_free);
            out.push(Need::new(Resource::Disk, "TB", stored_tb, usable_tb));
            // Two writes per message (store, delivered flag) on every replica, one read per
            // drained message.
            let cores = (m * 2.0 * rf + d) / f.scylla_ops_per_s_per_vcpu;
            out.push(Need::new(Resource::Cpu, "vCPU", cores, vcpu));
            out.push(Need::new(
                Resource::Network,
                "Gbit/s",
                gbits(m * (row + f.ack_bytes) * rf + d * row),
                net,
            ));
        }
        Tier::Redis => {
            let rf = f.redis_replication;
            let ops =
                (m * f.redis_ops_per_msg + load.logins_per_s_peak * f.redis_ops_per_login) * rf;
            out.push(Need::new(
                Resource::Cpu,
                "ops/s",
                ops,
                f.redis_ops_per_s_per_node * u,
            ));
            let gib = load.connections * f.redis_bytes_per_session * rf / GIB;
            out.push(Need::new(
                Resource::Memory,
                "GiB",
                gib,
                inst.memory_gib * u * (1.0 - f.redis_fork_reserve),
            ));
        }
    }
    if let Some(bad) = out
        .iter()
        .find(|n| n.demand > 0.0 && (n.usable_per_node.is_nan() || n.usable_per_node <= 0.0))
    {
        return Err(PlanError::NoCapacity {
            tier,
            resource: bad.resource,
            instance: inst.name.clone(),
        });
    }
    for n in &mut out {
        if n.demand <= 0.0 {
            n.nodes = 0.0;
        }
    }
    Ok(out)
}

/// The tier's minimum size: its replication factor, 1 for stateless tiers.
pub fn min_nodes(tier: Tier, figures: &Figures) -> u64 {
    // Replication factors are validated whole numbers.
    match tier {
        Tier::Edge | Tier::Core => 1,
        Tier::Kafka => figures.kafka_replication as u64,
        Tier::Scylla => figures.scylla_replication as u64,
        Tier::Redis => figures.redis_replication as u64,
    }
}

/// Plans `tier` on instance `inst`.
pub fn plan_tier(
    tier: Tier,
    target: &Target,
    figures: &Figures,
    catalog: &Catalog,
    inst: &Instance,
) -> Result<TierPlan, PlanError> {
    let mut needs = needs(tier, target, figures, inst)?;
    // Binding resource first; ties keep the model's order.
    needs.sort_by(|a, b| b.nodes.total_cmp(&a.nodes));
    let by_resources = needs.first().map_or(0, |n| ceil_nodes(n.nodes));
    let min = min_nodes(tier, figures);
    let (nodes, binding) = if by_resources >= min {
        (
            by_resources,
            needs.first().map_or(Resource::Replicas, |n| n.resource),
        )
    } else {
        (min, Resource::Replicas)
    };
    let runner_up = match (binding, needs.get(1)) {
        (Resource::Replicas, _) | (_, None) => None,
        (_, Some(n)) if ceil_nodes(n.nodes) >= min => Some(RunnerUp {
            resource: n.resource,
            nodes_per_region: ceil_nodes(n.nodes),
        }),
        _ => Some(RunnerUp {
            resource: Resource::Replicas,
            nodes_per_region: min,
        }),
    };
    let per_node = inst.hourly_usd * catalog.hours_per_month;
    let regions = u64::from(target.regions);
    Ok(TierPlan {
        tier,
        instance: inst.name.clone(),
        nodes_per_region: nodes,
        nodes_global: nodes * regions,
        binding,
        min_nodes: min,
        runner_up,
        needs,
        monthly_usd_per_node: per_node,
        monthly_usd_per_region: per_node * nodes as f64,
        monthly_usd_global: per_node * (nodes * regions) as f64,
    })
}

/// Plans every tier of `target` with `figures` on the instance types of `choice`.
pub fn plan(
    target: &Target,
    figures: &Figures,
    catalog: &Catalog,
    choice: &InstanceChoice,
) -> Result<Plan, PlanError> {
    target.validate()?;
    figures.validate()?;
    let mut tiers = Vec::with_capacity(Tier::ALL.len());
    for tier in Tier::ALL {
        let fixed = match choice.tiers.get(&tier) {
            Some(c) => c.clone(),
            None => Some(catalog.tier_default(tier)?.to_owned()),
        };
        let tp = match fixed {
            Some(name) => plan_tier(tier, target, figures, catalog, catalog.instance(&name)?)?,
            None => cheapest(tier, target, figures, catalog)?,
        };
        tiers.push(tp);
    }
    let nodes_per_region = tiers.iter().map(|t| t.nodes_per_region).sum();
    let nodes_global = tiers.iter().map(|t| t.nodes_global).sum();
    let monthly_usd_per_region = tiers.iter().map(|t| t.monthly_usd_per_region).sum();
    let monthly_usd_global = tiers.iter().map(|t| t.monthly_usd_global).sum();
    Ok(Plan {
        target: target.clone(),
        figures: figures.clone(),
        region_load: RegionLoad::of(target),
        tiers,
        nodes_per_region,
        nodes_global,
        monthly_usd_per_region,
        monthly_usd_global,
    })
}

/// The cheapest plan of `tier` over the catalog types whose roles include it (ties: fewer
/// nodes, then name).
fn cheapest(
    tier: Tier,
    target: &Target,
    figures: &Figures,
    catalog: &Catalog,
) -> Result<TierPlan, PlanError> {
    let mut best: Option<TierPlan> = None;
    for inst in catalog.instances.iter().filter(|i| i.roles.contains(&tier)) {
        let tp = match plan_tier(tier, target, figures, catalog, inst) {
            Ok(tp) => tp,
            Err(PlanError::NoCapacity { .. }) => continue,
            Err(e) => return Err(e),
        };
        let better = best.as_ref().is_none_or(|b| {
            (tp.monthly_usd_per_region, tp.nodes_per_region, &tp.instance)
                < (b.monthly_usd_per_region, b.nodes_per_region, &b.instance)
        });
        if better {
            best = Some(tp);
        }
    }
    best.ok_or(PlanError::NoCandidate(tier))
}
