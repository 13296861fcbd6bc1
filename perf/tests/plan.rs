//! Planner arithmetic against hand-worked examples, the design-assumption reproduction, catalog
//! parsing, figure sources and binding-resource flips (`iris_perf::plan`).

use iris_perf::plan::figures::{self, Overrides};
use iris_perf::plan::model::{ceil_nodes, needs};
use iris_perf::plan::{
    plan, render, Catalog, Figures, Format, InstanceChoice, Plan, Report, Resource, Target, Tier,
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[track_caller]
fn assert_close(a: f64, b: f64) {
    assert!(close(a, b), "{a} != {b}");
}

/// A catalog with round numbers, for hand-worked examples. 100 billing hours a month.
const SMALL_CATALOG: &str = r#"
hours_per_month = 100

[tiers]
edge = "t.cpu"
core = "t.cpu"
kafka = "t.disk"
scylla = "t.disk"
redis = "t.mem"

[[instance]]
name = "t.cpu"
vcpu = 10
memory_gib = 20
network_gbps = 1
hourly_usd = 1.0
roles = ["edge", "core"]

[[instance]]
name = "t.disk"
vcpu = 10
memory_gib = 20
network_gbps = 1
disk_gb = 1000
disk_write_mb_s = 100
hourly_usd = 2.0
roles = ["kafka", "scylla"]

[[instance]]
name = "t.mem"
vcpu = 2
memory_gib = 8
network_gbps = 1
hourly_usd = 0.5
roles = ["redis"]
"#;

/// Two regions, each: 1,000,000 homed users, 500,000 connected, 10,000 msgs/s average,
/// 20,000/s peak, 200 logins/s peak, 5,000 drained msgs/s peak. Headroom 50%: every node is
/// planned to half of each ceiling.
fn small_target() -> Target {
    Target {
        users: 2_000_000.0,
        regions: 2,
        msgs_per_day: 1_728_000_000.0, // 2 × 10,000/s × 86,400 s
        msg_bytes: 100.0,
        peak_to_avg: 2.0,
        headroom: 0.5,
        concurrency: 0.5,
        logins_per_user_per_day: 8.64, // 1,000,000 × 8.64 / 86,400 = 100/s average
        offline_fraction: 0.25,
        cross_region_fraction: 0.0,
    }
}

fn small_figures() -> Figures {
    Figures {
        edge_conns_per_node: 50_000.0,
        edge_bytes_per_idle_conn: 16_384.0,
        edge_kernel_bytes_per_conn: 0.0,
        edge_base_memory_gib: 1.0,
        edge_msgs_per_core_per_s: 1_000.0,
        logins_per_s_per_core: 100.0,
        drain_msgs_per_s: 2_500.0,
        wire_overhead_bytes: 64.0,
        core_msgs_per_s_per_vcpu: 1_000.0,
        core_drain_msgs_per_s_per_vcpu: 5_000.0,
        kafka_record_overhead_bytes: 70.0,
        ack_bytes: 40.0,
        kafka_replication: 3.0,
        kafka_retention_hours: 10.0,
        kafka_records_per_s_per_vcpu: 10_000.0,
        scylla_row_overhead_bytes: 60.0,
        scylla_compression: 0.5,
        scylla_replication: 3.0,
        scylla_retention_days: 1.0,
        scylla_compaction_free: 0.5,
        scylla_ops_per_s_per_vcpu: 5_000.0,
        redis_ops_per_s_per_node: 100_000.0,
        redis_ops_per_msg: 1.0,
        redis_ops_per_login: 3.0,
        redis_bytes_per_session: 400.0,
        redis_replication: 2.0,
        redis_fork_reserve: 0.5,
    }
}

fn small_plan() -> Plan {
    let catalog = Catalog::parse(SMALL_CATALOG).unwrap();
    plan(
        &small_target(),
        &small_figures(),
        &catalog,
        &InstanceChoice::default(),
    )
    .unwrap()
}

fn need(p: &Plan, tier: Tier, r: Resource) -> f64 {
    p.tier(tier)
        .needs
        .iter()
        .find(|n| n.resource == r)
        .unwrap()
        .nodes
}

fn design_plan() -> Plan {
    plan(
        &Target::default(),
        &Figures::default(),
        &Catalog::default(),
        &InstanceChoice::default(),
    )
    .unwrap()
}

#[test]
fn hand_worked_region_load() {
    let l = small_plan().region_load;
    assert_close(l.homed_users, 1_000_000.0);
    assert_close(l.connections, 500_000.0);
    assert_close(l.msgs_per_s_avg, 10_000.0);
    assert_close(l.msgs_per_s_peak, 20_000.0);
    assert_close(l.logins_per_s_peak, 200.0);
    assert_close(l.drain_msgs_per_s_peak, 5_000.0);
}

#[test]
fn hand_worked_edge() {
    let p = small_plan();
    // Connections: 500,000 / (50,000 × 0.5) = 20 nodes.
    assert_close(need(&p, Tier::Edge, Resource::Connections), 20.0);
    // CPU: 20,000/1,000 + 200/100 + 5,000/2,500 = 24 vCPU over 10 × 0.5 = 5 per node: 4.8.
    assert_close(need(&p, Tier::Edge, Resource::Cpu), 4.8);
    // Memory: 500,000 × 16 KiB = 7.6294 GiB over 20 × 0.5 − 1 = 9 GiB per node.
    assert_close(
        need(&p, Tier::Edge, Resource::Memory),
        500_000.0 * 16_384.0 / 1_073_741_824.0 / 9.0,
    );
    // Network: 20,000 × (100 + 64) B × 4 hops × 8 = 0.10496 Gbit/s over 0.5: 0.20992.
    assert_close(need(&p, Tier::Edge, Resource::Network), 0.20992);
    let e = p.tier(Tier::Edge);
    assert_eq!(
        (e.nodes_per_region, e.nodes_global, e.binding),
        (20, 40, Resource::Connections)
    );
    let next = e.runner_up.as_ref().unwrap();
    assert_eq!((next.resource, next.nodes_per_region), (Resource::Cpu, 5));
}

#[test]
fn hand_worked_core() {
    let p = small_plan();
    // CPU: 20,000/1,000 + 5,000/5,000 = 21 vCPU over 5 per node: 4.2 → 5 nodes.
    assert_close(need(&p, Tier::Core, Resource::Cpu), 4.2);
    // Network: (20,000 × 170 × 3 + 5,000 × 160) B/s × 8 = 88 Mbit/s over 0.5 Gbit/s: 0.176.
    assert_close(need(&p, Tier::Core, Resource::Network), 0.176);
    let c = p.tier(Tier::Core);
    assert_eq!((c.nodes_per_region, c.binding), (5, Resource::Cpu));
}

#[test]
fn hand_worked_kafka() {
    let p = small_plan();
    // No cross-region traffic: 2 message records (deliver, inbox) of 170 B + 1 ack of 40 B
    // = 380 B and 3 records per message, RF 3.
    // CPU: 20,000 × 3 × 3 / 10,000 = 18 vCPU over 5: 3.6 → 4 nodes.
    assert_close(need(&p, Tier::Kafka, Resource::Cpu), 3.6);
    // Disk: 10,000 × 380 × 3 B/s × 10 h × 3,600 s = 0.4104 TB over 1 TB × 0.5: 0.8208.
    assert_close(need(&p, Tier::Kafka, Resource::Disk), 0.8208);
    // Disk I/O: 20,000 × 380 × 3 = 22.8 MB/s over 100 × 0.5: 0.456.
    assert_close(need(&p, Tier::Kafka, Resource::DiskIo), 0.456);
    // Network: 22.8 MB/s × 8 = 0.1824 Gbit/s over 0.5: 0.3648.
    assert_close(need(&p, Tier::Kafka, Resource::Network), 0.3648);
    let k = p.tier(Tier::Kafka);
    assert_eq!((k.nodes_per_region, k.binding), (4, Resource::Cpu));
}

#[test]
fn hand_worked_scylla_exact_integer_demand() {
    let p = small_plan();
    // CPU: (20,000 × 2 writes × RF 3 + 5,000 reads) / 5,000 = 25 vCPU over 5: exactly 5 nodes,
    // not 6.
    assert_close(need(&p, Tier::Scylla, Resource::Cpu), 5.0);
    // Disk: 10,000/s × 86,400 s × 1 day × 160 B × 0.5 × 3 = 0.20736 TB over
    // 1 TB × 0.5 × (1 − 0.5) = 0.25 TB: 0.82944.
    assert_close(need(&p, Tier::Scylla, Resource::Disk), 0.82944);
    // Network: (20,000 × 200 × 3 + 5,000 × 160) × 8 = 102.4 Mbit/s over 0.5: 0.2048.
    assert_close(need(&p, Tier::Scylla, Resource::Network), 0.2048);
    let s = p.tier(Tier::Scylla);
    assert_eq!((s.nodes_per_region, s.binding), (5, Resource::Cpu));
}

#[test]
fn hand_worked_redis_at_minimum_size() {
    let p = small_plan();
    // Ops: (20,000 × 1 + 200 × 3) × 2 copies = 41,200/s over 100,000 × 0.5: 0.824 → 1 node,
    // below the 2 copies: 2 nodes, bound by replicas.
    assert_close(need(&p, Tier::Redis, Resource::Cpu), 0.824);
    // Memory: 500,000 × 400 B × 2 = 0.3725 GiB over 8 × 0.5 × 0.5 = 2 GiB.
    assert_close(
        need(&p, Tier::Redis, Resource::Memory),
        400_000_000.0 / 1_073_741_824.0 / 2.0,
    );
    let r = p.tier(Tier::Redis);
    assert_eq!(
        (r.nodes_per_region, r.binding, r.min_nodes),
        (2, Resource::Replicas, 2)
    );
    assert!(r.runner_up.is_none());
}

#[test]
fn hand_worked_totals_and_cost() {
    let p = small_plan();
    // Per region: 20 + 5 + 4 + 5 + 2 = 36 nodes; two regions: 72.
    assert_eq!((p.nodes_per_region, p.nodes_global), (36, 72));
    // 100 h/month: edge 20 × $1, core 5 × $1, kafka 4 × $2, scylla 5 × $2, redis 2 × $0.5
    // = $44/h per region → $4,400 a month, $8,800 for both regions.
    assert_close(p.monthly_usd_per_region, 4_400.0);
    assert_close(p.monthly_usd_global, 8_800.0);
    assert_close(p.tier(Tier::Kafka).monthly_usd_global, 1_600.0);
}

#[test]
fn cross_region_traffic_adds_kafka_records() {
    let catalog = Catalog::parse(SMALL_CATALOG).unwrap();
    let mut t = small_target();
    t.cross_region_fraction = 0.5;
    let p = plan(&t, &small_figures(), &catalog, &InstanceChoice::default()).unwrap();
    // 2.5 message records + 1.5 ack records = 4 per message: 20,000 × 4 × 3 / 10,000 = 24 vCPU
    // over 5: 4.8.
    assert_close(need(&p, Tier::Kafka, Resource::Cpu), 4.8);
}

#[test]
fn ceil_forgives_float_noise_only() {
    assert_eq!(ceil_nodes(100.0), 100);
    assert_eq!(ceil_nodes(100.000_000_000_1), 100);
    assert_eq!(ceil_nodes(100.01), 101);
    assert_eq!(ceil_nodes(0.2), 1);
    assert_eq!(ceil_nodes(0.0), 0);
}

#[test]
fn design_assumptions_reproduce_the_design_tables() {
    let p = design_plan();
    // 1 B users, 50 regions, half connected: 10 M connections per region.
    assert_close(p.region_load.connections, 10_000_000.0);
    assert_eq!(p.tier(Tier::Edge).nodes_per_region, 100);
    assert_eq!(p.tier(Tier::Core).nodes_per_region, 20);
    assert_eq!(p.tier(Tier::Edge).binding, Resource::Connections);
    assert_eq!(p.tier(Tier::Core).binding, Resource::Cpu);
    assert_eq!(p.tier(Tier::Kafka).binding, Resource::Disk);
    assert_eq!(p.tier(Tier::Scylla).binding, Resource::Disk);
    assert_eq!(p.tier(Tier::Redis).binding, Resource::Cpu);
    // ~7,000 nodes (±10%), all five tiers, 50 regions.
    assert!(
        (6_300..=7_700).contains(&p.nodes_global),
        "{} nodes",
        p.nodes_global
    );
    assert_eq!(p.nodes_global, p.nodes_per_region * 50);
    // $3–4 M a month.
    assert!(
        (3e6..=4e6).contains(&p.monthly_usd_global),
        "${}",
        p.monthly_usd_global
    );
    // Exactly: 100 + 20 + 8 + 12 + 4 = 144 per region; 120 × $496.40 + 8 × $455.52
    // + 12 × $911.04 + 4 × $367.92 = $75,616.32 per region.
    assert_eq!(p.nodes_global, 7_200);
    assert_close(p.monthly_usd_global, 75_616.32 * 50.0);
}

#[test]
fn more_memory_per_connection_makes_edge_memory_bound() {
    // 10 M × (256 + 4) KiB = 2,479.6 GiB over 32 × 0.8 − 2 = 23.6 GiB: 105.07 → 106 nodes.
    let f = Figures {
        edge_bytes_per_idle_conn: 262_144.0,
        ..Default::default()
    };
    let p = plan(
        &Target::default(),
        &f,
        &Catalog::default(),
        &InstanceChoice::default(),
    )
    .unwrap();
    let e = p.tier(Tier::Edge);
    assert_eq!((e.binding, e.nodes_per_region), (Resource::Memory, 106));
    assert_eq!(
        e.runner_up.as_ref().unwrap().resource,
        Resource::Connections
    );
}

#[test]
fn slower_edge_cpu_makes_edge_cpu_bound() {
    // 347,222 msgs/s / 250 + 5,556/2,000 + 69,444/20,000 = 1,395.2 vCPU over 12.8 per node:
    // 109.0 → 109 nodes, more than the 100 the connections need.
    let f = Figures {
        edge_msgs_per_core_per_s: 250.0,
        ..Default::default()
    };
    let p = plan(
        &Target::default(),
        &f,
        &Catalog::default(),
        &InstanceChoice::default(),
    )
    .unwrap();
    assert_eq!(p.tier(Tier::Edge).binding, Resource::Cpu);
    assert_eq!(p.tier(Tier::Edge).nodes_per_region, 109);
}

#[test]
fn short_kafka_retention_makes_kafka_cpu_bound() {
    let f = Figures {
        kafka_retention_hours: 1.0,
        ..Default::default()
    };
    let p = plan(
        &Target::default(),
        &f,
        &Catalog::default(),
        &InstanceChoice::default(),
    )
    .unwrap();
    assert_eq!(p.tier(Tier::Kafka).binding, Resource::Cpu);
    assert_eq!(p.tier(Tier::Kafka).nodes_per_region, 6);
}

#[test]
fn headroom_scales_every_ceiling() {
    let t = Target {
        headroom: 0.0,
        ..Default::default()
    };
    let p = plan(
        &t,
        &Figures::default(),
        &Catalog::default(),
        &InstanceChoice::default(),
    )
    .unwrap();
    // 10 M / 125 k = 80 edge nodes; core 253 vCPU / 16 = 15.8 → 16.
    assert_eq!(p.tier(Tier::Edge).nodes_per_region, 80);
    assert_eq!(p.tier(Tier::Core).nodes_per_region, 16);
}

#[test]
fn catalog_override_parses_and_prices() {
    let text = Catalog::default();
    let mut toml_text =
        iris_perf::plan::catalog::DEFAULT_CATALOG.replace("hourly_usd = 0.68", "hourly_usd = 1.0");
    toml_text = toml_text.replace("hours_per_month = 730", "hours_per_month = 700");
    let c = Catalog::parse(&toml_text).unwrap();
    assert_ne!(c, text);
    assert_close(c.instance("c6i.4xlarge").unwrap().hourly_usd, 1.0);
    let p = plan(
        &Target::default(),
        &Figures::default(),
        &c,
        &InstanceChoice::default(),
    )
    .unwrap();
    // Edge: 5,000 nodes × $1 × 700 h.
    assert_close(p.tier(Tier::Edge).monthly_usd_global, 3_500_000.0);

    // Another default type for a tier, and a file on disk.
    let swapped = iris_perf::plan::catalog::DEFAULT_CATALOG
        .replace("edge = \"c6i.4xlarge\"", "edge = \"c6i.2xlarge\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, swapped).unwrap();
    let c = Catalog::load(&path).unwrap();
    let p = plan(
        &Target::default(),
        &Figures::default(),
        &c,
        &InstanceChoice::default(),
    )
    .unwrap();
    assert_eq!(p.tier(Tier::Edge).instance, "c6i.2xlarge");
    assert_eq!(p.tier(Tier::Edge).nodes_per_region, 100);
    assert_close(
        p.tier(Tier::Edge).monthly_usd_per_region,
        100.0 * 0.34 * 730.0,
    );
}

#[test]
fn catalog_errors_are_reported() {
    let dangling = SMALL_CATALOG.replace("redis = \"t.mem\"", "redis = \"t.nope\"");
    assert!(Catalog::parse(&dangling)
        .unwrap_err()
        .to_string()
        .contains("t.nope"));
    let unknown_field = SMALL_CATALOG.replace("vcpu = 2\n", "vcpu = 2\ncolour = \"red\"\n");
    assert!(Catalog::parse(&unknown_field).is_err());
    let no_tier = SMALL_CATALOG.replace("redis = \"t.mem\"\n", "");
    assert!(Catalog::parse(&no_tier)
        .unwrap_err()
        .to_string()
        .contains("redis"));
    let zero_cpu = SMALL_CATALOG.replace("vcpu = 2\n", "vcpu = 0\n");
    assert!(Catalog::parse(&zero_cpu).is_err());
}

#[test]
fn instance_without_resource_is_an_error_and_auto_skips_it() {
    let c = Catalog::default();
    // c6i has no local disk: Kafka cannot live on it.
    let mut choice = InstanceChoice::default();
    choice.set(Tier::Kafka, "c6i.4xlarge");
    let err = plan(&Target::default(), &Figures::default(), &c, &choice).unwrap_err();
    assert!(err.to_string().contains("disk"), "{err}");
    // auto picks the cheapest type whose roles include the tier.
    let mut choice = InstanceChoice::default();
    choice.set(Tier::Scylla, "auto");
    let auto = plan(&Target::default(), &Figures::default(), &c, &choice).unwrap();
    let fixed = design_plan();
    assert!(
        auto.tier(Tier::Scylla).monthly_usd_global <= fixed.tier(Tier::Scylla).monthly_usd_global
    );
    assert!(auto.tier(Tier::Scylla).instance.starts_with("i3."));
}

#[test]
fn invalid_inputs_are_rejected() {
    let c = Catalog::default();
    let ch = InstanceChoice::default();
    let t = Target {
        headroom: 1.0,
        ..Default::default()
    };
    assert!(plan(&t, &Figures::default(), &c, &ch).is_err());
    let f = Figures {
        kafka_replication: 2.5,
        ..Default::default()
    };
    assert!(plan(&Target::default(), &f, &c, &ch).is_err());
    let f = Figures {
        edge_base_memory_gib: 64.0,
        ..Default::default()
    }; // more than a c6i.4xlarge has
    let err = plan(&Target::default(), &f, &c, &ch).unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
}

#[test]
fn assume_sets_target_and_figures() {
    let mut t = Target::default();
    let mut f = Figures::default();
    figures::assume(&mut t, &mut f, "regions", 10.0).unwrap();
    figures::assume(&mut t, &mut f, "peak-to-avg", 2.0).unwrap();
    figures::assume(&mut t, &mut f, "conns_per_node", 1e6).unwrap(); // alias
    assert_eq!(t.regions, 10);
    assert_close(t.peak_to_avg, 2.0);
    assert_close(f.edge_conns_per_node, 1e6);
    assert!(figures::assume(&mut t, &mut f, "regions", 2.5).is_err());
    assert!(figures::assume(&mut t, &mut f, "no_such_key", 1.0).is_err());
    assert_eq!(
        figures::parse_assignment("edge_conns_per_node=125_000")
            .unwrap()
            .1,
        125_000.0
    );
    assert!(figures::parse_assignment("edge_conns_per_node").is_err());
}

#[test]
fn figures_file_toml_and_json_strict() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("figures.toml");
    std::fs::write(
        &toml_path,
        "note = \"bench box\"\nedge_msgs_per_core_per_s = 200000\n[figures]\nbytes_per_idle_conn = 1800\n",
    )
    .unwrap();
    let o = figures::figures_file(&toml_path).unwrap();
    assert_close(o.values["edge_msgs_per_core_per_s"].value, 200_000.0);
    assert_close(o.values["edge_bytes_per_idle_conn"].value, 1_800.0);
    assert!(o.values["edge_bytes_per_idle_conn"]
        .source
        .ends_with("figures.bytes_per_idle_conn"));

    let json_path = dir.path().join("figures.json");
    std::fs::write(
        &json_path,
        r#"{"drain_msgs_per_s": 600000, "logins_per_s_per_core": "55,000"}"#,
    )
    .unwrap();
    let o = figures::figures_file(&json_path).unwrap();
    assert_close(o.values["drain_msgs_per_s"].value, 600_000.0);
    assert_close(o.values["logins_per_s_per_core"].value, 55_000.0);

    std::fs::write(&json_path, r#"{"edge_msgs_per_core": 1}"#).unwrap();
    let err = figures::figures_file(&json_path).unwrap_err().to_string();
    assert!(err.contains("edge_msgs_per_core"), "{err}");
}

#[test]
fn results_json_is_read_leniently() {
    let v: serde_json::Value = serde_json::from_str(
        r#"{
            "scenario": "pairs",
            "edge_msgs_per_core_per_s": 100000,
            "edge_bytes_per_idle_conn": 1900,
            "latency": {"p99_us": 800},
            "logins_per_s": "not measured",
            "figures": {"edge_msgs_per_core_per_s": 180000, "drain_msgs_per_s_per_core": 520000}
        }"#,
    )
    .unwrap();
    let (o, read) = figures::results_value(&v, "r.json");
    // The `figures` object wins over the top level.
    assert_close(o.values["edge_msgs_per_core_per_s"].value, 180_000.0);
    assert_close(o.values["edge_bytes_per_idle_conn"].value, 1_900.0);
    assert_close(o.values["drain_msgs_per_s"].value, 520_000.0);
    assert!(!o.values.contains_key("logins_per_s_per_core"));
    assert!(read
        .used
        .contains(&"figures.drain_msgs_per_s_per_core".to_owned()));
    assert!(read.note.is_none());

    let (o, read) = figures::results_value(&serde_json::json!([1, 2]), "r.json");
    assert!(o.is_empty());
    assert!(read.note.unwrap().contains("not a JSON object"));
}

#[test]
fn measured_section_reports_the_delta() {
    let mut o = Overrides::design_goals();
    o.set("edge_conns_per_node", 1e6, "test").unwrap();
    let r = Report::build(
        &Target::default(),
        &Figures::default(),
        &Catalog::default(),
        &InstanceChoice::default(),
        &o,
        Vec::new(),
    )
    .unwrap();
    let m = r.measured.as_ref().unwrap();
    // 10 M / (1 M × 0.8) = 12.5 → 13 edge nodes per region.
    assert_eq!(m.plan.tier(Tier::Edge).nodes_per_region, 13);
    assert_eq!(m.delta.tiers[0].nodes_per_region, -87);
    assert_eq!(m.delta.nodes_global, -87 * 50);
    assert_close(m.delta.monthly_usd_global, -87.0 * 50.0 * 0.68 * 730.0);
    assert_eq!(m.figures_used.len(), 5);

    let md = render(&r, Format::Markdown).unwrap();
    assert!(
        md.contains("| edge | c6i.4xlarge | 100 | 5,000 | connections |"),
        "{md}"
    );
    assert!(md.contains("## With measured figures"));
    let text = render(&r, Format::Table).unwrap();
    assert!(text.contains("100 -> 13"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json).unwrap()).unwrap();
    assert_eq!(json["measured"]["plan"]["tiers"][0]["nodes_per_region"], 13);
}

#[test]
fn needs_are_per_resource_and_per_instance() {
    let c = Catalog::default();
    let small = needs(
        Tier::Edge,
        &Target::default(),
        &Figures::default(),
        c.instance("c6i.2xlarge").unwrap(),
    )
    .unwrap();
    let cpu = small.iter().find(|n| n.resource == Resource::Cpu).unwrap();
    // 8 vCPU × 0.8 per node.
    assert_close(cpu.usable_per_node, 6.4);
}
