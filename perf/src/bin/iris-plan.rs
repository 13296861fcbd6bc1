//! `iris-plan`: the Iris capacity planner.
//!
//! Plans the edge, core, Kafka, ScyllaDB and Redis tiers for a workload on the seed design's
//! per-node figures and, when figures are given (`--figures`, `--results`, `--goals` or the
//! figure flags), on those figures too, with the difference. See `docs/CAPACITY.md`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use iris_perf::plan::figures::{self, Overrides};
use iris_perf::plan::{render, Catalog, Figures, Format, InstanceChoice, Report, Target, Tier};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutFormat {
    Table,
    Markdown,
    Json,
}

/// Iris capacity planner: node counts, binding resources and monthly cost per tier.
///
/// Without figures it plans on the seed design's per-node figures; with `--figures`,
/// `--results`, `--goals` or any figure flag it also plans on those and prints the change.
#[derive(Debug, Parser)]
#[command(name = "iris-plan", version)]
struct Args {
    /// Registered users, all regions (e.g. 1e9).
    #[arg(long)]
    users: Option<f64>,
    /// Regions; users are homed evenly over them.
    #[arg(long)]
    regions: Option<u32>,
    /// Messages per day, all regions (e.g. 5e11).
    #[arg(long)]
    msgs_per_day: Option<f64>,
    /// Payload bytes per message.
    #[arg(long)]
    msg_bytes: Option<f64>,
    /// Peak-hour rate over the daily average.
    #[arg(long)]
    peak_to_avg: Option<f64>,
    /// Share of every resource kept free, 0..1 (0.2: nodes planned to 80% of their ceiling).
    #[arg(long)]
    headroom: Option<f64>,
    /// Share of homed users connected at the peak, 0..1.
    #[arg(long)]
    concurrency: Option<f64>,
    /// Logins per user per day.
    #[arg(long)]
    logins_per_user_per_day: Option<f64>,
    /// Share of messages sent to offline users (stored, drained at login), 0..1.
    #[arg(long)]
    offline_fraction: Option<f64>,
    /// Share of messages to users homed in another region, 0..1.
    #[arg(long)]
    cross_region_fraction: Option<f64>,

    /// Instance catalog TOML (default: the embedded perf/catalog.toml).
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Instance type of a tier, or `auto` for the cheapest fitting one (repeatable).
    #[arg(long = "instance", value_name = "TIER=TYPE|auto")]
    instances: Vec<String>,
    /// Change a seed assumption (any target or figure key) for both plans (repeatable).
    #[arg(long = "assume", value_name = "KEY=VALUE")]
    assume: Vec<String>,

    /// Results JSON from iris-load: figure keys are read from its top level or its `figures`
    /// object (repeatable; later files win).
    #[arg(long, value_name = "FILE")]
    results: Vec<PathBuf>,
    /// Figures file (JSON or TOML) of measured per-node figures.
    #[arg(long, value_name = "FILE")]
    figures: Option<PathBuf>,
    /// Plan also on the DESIGN.md per-core goals (250k msgs/s, 2 KB/conn, 50k logins/s,
    /// 500k drained msgs/s); files and flags override them.
    #[arg(long)]
    goals: bool,
    /// Measured edge messages/s per core (delivered and acked).
    #[arg(long)]
    edge_msgs_per_core_per_s: Option<f64>,
    /// Measured connection ceiling of one edge node.
    #[arg(long)]
    edge_conns_per_node: Option<f64>,
    /// Measured user-space bytes per idle logged-in connection.
    #[arg(long)]
    edge_bytes_per_idle_conn: Option<f64>,
    /// Measured logins/s per edge core.
    #[arg(long)]
    logins_per_s_per_core: Option<f64>,
    /// Measured stored-message drain at login, messages/s per edge core.
    #[arg(long)]
    drain_msgs_per_s: Option<f64>,
    /// Any other measured figure (repeatable).
    #[arg(long = "measured", value_name = "KEY=VALUE")]
    measured: Vec<String>,

    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutFormat,
    /// Print the effective target and seed figures as TOML (a figures-file template) and exit.
    #[arg(long)]
    print_assumptions: bool,
    /// Print the embedded instance catalog and exit.
    #[arg(long)]
    print_catalog: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.print_catalog {
        print!("{}", iris_perf::plan::catalog::DEFAULT_CATALOG);
        return Ok(());
    }

    let catalog = match &args.catalog {
        Some(path) => Catalog::load(path)?,
        None => Catalog::default(),
    };

    let mut target = Target::default();
    let mut seed = Figures::default();
    for a in &args.assume {
        let (k, v) = figures::parse_assignment(a)?;
        figures::assume(&mut target, &mut seed, &k, v).with_context(|| format!("--assume {a}"))?;
    }
    let flags = [
        ("users", args.users),
        ("regions", args.regions.map(f64::from)),
        ("msgs_per_day", args.msgs_per_day),
        ("msg_bytes", args.msg_bytes),
        ("peak_to_avg", args.peak_to_avg),
        ("headroom", args.headroom),
        ("concurrency", args.concurrency),
        ("logins_per_user_per_day", args.logins_per_user_per_day),
        ("offline_fraction", args.offline_fraction),
        ("cross_region_fraction", args.cross_region_fraction),
    ];
    for (k, v) in flags {
        if let Some(v) = v {
            figures::assume(&mut target, &mut seed, k, v)
                .with_context(|| format!("--{}", k.replace('_', "-")))?;
        }
    }
    target.validate()?;
    seed.validate()?;

    if args.print_assumptions {
        println!("# Target (set with flags or --assume KEY=VALUE):");
        for line in toml::to_string(&target)?.lines() {
            println!("# {line}");
        }
        println!();
        println!("# Per-node figures (a --figures file takes any of these keys):");
        print!("{}", toml::to_string(&seed)?);
        return Ok(());
    }

    let mut choice = InstanceChoice::default();
    for spec in &args.instances {
        let (tier, name) = spec
            .split_once('=')
            .with_context(|| format!("--instance {spec}: expected TIER=TYPE or TIER=auto"))?;
        let tier: Tier = tier.parse()?;
        if !name.eq_ignore_ascii_case("auto") {
            catalog.instance(name.trim())?;
        }
        choice.set(tier, name.trim());
    }

    let mut overrides = if args.goals {
        Overrides::design_goals()
    } else {
        Overrides::default()
    };
    let mut results_read = Vec::new();
    for path in &args.results {
        let (o, read) = figures::results_file(path)?;
        if read.used.is_empty() {
            eprintln!(
                "iris-plan: {}: {}",
                read.path,
                read.note.as_deref().unwrap_or("no figures used")
            );
        }
        overrides.merge(o);
        results_read.push(read);
    }
    if let Some(path) = &args.figures {
        overrides.merge(figures::figures_file(path)?);
    }
    let flag_figures = [
        ("edge_msgs_per_core_per_s", args.edge_msgs_per_core_per_s),
        ("edge_conns_per_node", args.edge_conns_per_node),
        ("edge_bytes_per_idle_conn", args.edge_bytes_per_idle_conn),
        ("logins_per_s_per_core", args.logins_per_s_per_core),
        ("drain_msgs_per_s", args.drain_msgs_per_s),
    ];
    for (k, v) in flag_figures {
        if let Some(v) = v {
            overrides.set(k, v, &format!("--{}", k.replace('_', "-")))?;
        }
    }
    for m in &args.measured {
        let (k, v) = figures::parse_assignment(m)?;
        overrides.set(&k, v, &format!("--measured {k}"))?;
    }

    let report = Report::build(&target, &seed, &catalog, &choice, &overrides, results_read)?;
    let format = match args.format {
        OutFormat::Table => Format::Table,
        OutFormat::Markdown => Format::Markdown,
        OutFormat::Json => Format::Json,
    };
    print!("{}", render(&report, format)?);
    Ok(())
}
