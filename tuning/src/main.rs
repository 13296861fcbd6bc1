//! `iris-tune`: checks, plans and tunes a host for `iris-edge`.
//!
//! `check` reports every setting that matters (exit 1 when anything is critical), `plan` prints
//! the shard count and core map as an `iris-edge` config fragment, `apply` writes the tuning
//! (or prints it as a shell script with `--dry-run`), `profiles` lists the instance profiles.
//! All reads and writes go through `--root` (default `/`). Exit codes: 0 fine, 1 critical
//! findings (check) or failed actions (apply), 2 usage or input errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use iris_tuning::report::CheckReport;
use iris_tuning::{
    apply, CheckContext, CollectOptions, EdgeSettings, Host, ProfileSet, Root,
    DEFAULT_IO_MEMORY_BYTES, DEFAULT_RING_DEPTH,
};

#[derive(Debug, Parser)]
#[command(
    name = "iris-tune",
    version,
    about = "Check, plan and tune a host for iris-edge (thread-per-core, io_uring, many sockets)"
)]
struct Cli {
    /// Directory standing for `/`: every file is read and written under it (fixture trees).
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    /// Profiles file layered over the built-in profiles (same format as tuning/profiles.toml).
    #[arg(long, global = true, value_name = "FILE")]
    profiles: Option<PathBuf>,
    /// Instance profile (c6i.2xlarge, c6i.4xlarge, i3.4xlarge, ...; see `iris-tune profiles`).
    /// Default: the host's DMI product name if a profile has that name, else `generic`.
    #[arg(long, global = true, value_name = "NAME")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report every setting that matters, with current and wanted value, severity and why.
    /// Exits 1 when anything is critical.
    Check(CheckArgs),
    /// Print the recommended shard count and core map as an iris-edge config fragment.
    Plan {
        /// Print the plan as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Write sysctl.d, limits.d and systemd drop-in files and set IRQ affinity, governor, huge
    /// pages, clock source and NVMe scheduler; with --dry-run print it as a shell script.
    Apply {
        /// Print a shell script, change nothing (default when not root on the real `/`).
        #[arg(long)]
        dry_run: bool,
    },
    /// List the profiles.
    Profiles,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Show the reason under every row, OK ones too.
    #[arg(long, short)]
    verbose: bool,
    /// Take `shards`, `cpus`, `io_memory_bytes` and `ring_depth` from this iris-edge config.
    #[arg(long, value_name = "FILE")]
    edge_config: Option<PathBuf>,
    /// Shards to size locked memory for (default: the edge config's, else the plan's).
    #[arg(long)]
    shards: Option<usize>,
    /// Locked memory each shard registers (default: the edge config's, else 524288).
    #[arg(long)]
    io_memory_bytes: Option<usize>,
    /// io_uring ring depth (default: the edge config's, else 128).
    #[arg(long)]
    ring_depth: Option<usize>,
    /// Do not run the live probes (an io_uring ring for the opcodes, two pinned threads for the
    /// cost of a wake-up).
    #[arg(long)]
    no_probe: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("iris-tune: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let profiles = ProfileSet::load(cli.profiles.as_deref())?;
    let root = Root::new(&cli.root);
    if !root.is_live() && !cli.root.is_dir() {
        anyhow::bail!("--root {} is not a directory", cli.root.display());
    }
    match cli.command {
        Command::Profiles => {
            for name in profiles.names() {
                let p = profiles.resolve(&name)?;
                println!("{name:<16} {}", p.description);
            }
            Ok(0)
        }
        Command::Check(args) => check(root, &profiles, cli.profile.as_deref(), &args),
        Command::Plan { json } => {
            let host = Host::open(
                root,
                &profiles,
                cli.profile.as_deref(),
                CollectOptions::default(),
            )?;
            let plan = host.plan(DEFAULT_IO_MEMORY_BYTES, DEFAULT_RING_DEPTH);
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.to_edge_toml(&host.profile, host.selection));
            }
            Ok(0)
        }
        Command::Apply { dry_run } => {
            let host = Host::open(
                root,
                &profiles,
                cli.profile.as_deref(),
                CollectOptions::default(),
            )?;
            let actions = host.actions();
            let not_root = host.facts.euid.is_some_and(|uid| uid != 0);
            if dry_run || (host.root.is_live() && not_root) {
                if !dry_run {
                    eprintln!("iris-tune: not root: printing the script instead (--dry-run)");
                }
                print!("{}", apply::script(&host.root, &actions));
                return Ok(0);
            }
            let report = apply::apply(&host.root, &actions);
            for line in &report.lines {
                println!("{line}");
            }
            Ok(if report.failed.is_empty() { 0 } else { 1 })
        }
    }
}

fn check(
    root: Root,
    profiles: &ProfileSet,
    profile: Option<&str>,
    args: &CheckArgs,
) -> anyhow::Result<u8> {
    let edge = match &args.edge_config {
        Some(path) => EdgeSettings::from_file(path)?,
        None => EdgeSettings::default(),
    };
    let host = Host::open(
        root,
        profiles,
        profile,
        CollectOptions {
            probe_uring: !args.no_probe,
            probe_wake: !args.no_probe,
        },
    )?;
    let ctx = CheckContext {
        shards: args.shards.or(edge.shards).filter(|&s| s > 0),
        shard_cpus: edge.cpus.clone().filter(|c| !c.is_empty()),
        io_memory_bytes: args
            .io_memory_bytes
            .or(edge.io_memory_bytes)
            .unwrap_or(DEFAULT_IO_MEMORY_BYTES),
        ring_depth: args
            .ring_depth
            .or(edge.ring_depth)
            .unwrap_or(DEFAULT_RING_DEPTH),
        this_process: false,
    };
    let findings = host.check(&ctx);
    let report = CheckReport::new(
        host.root.dir().display().to_string(),
        host.profile.name.clone(),
        host.selection,
        host.plan(ctx.io_memory_bytes, ctx.ring_depth),
        findings,
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serializing the report")?
        );
    } else {
        print!("{}", report.table(args.verbose));
    }
    Ok(u8::from(report.critical))
}
