//! `iris-edge` binary: flags and config file, host checks, then the shards until SIGTERM/SIGINT.
//!
//! Prints one line to standard output once serving, for scripts and tests:
//! `iris-edge listening client=ADDR admin=ADDR shards=N`. Logs go to standard error
//! (`RUST_LOG` filters them, default `info`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use iris_edge::config::EdgeConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Iris edge: a thread-per-core v1 chat server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Client listener address [default: 0.0.0.0:8085].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory of the embedded store [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of shards [default: one per CPU this process may use].
    #[arg(long)]
    shards: Option<usize>,
    /// Admin HTTP address for /metrics and /health [default: 127.0.0.1:9085].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(p) => EdgeConfig::load(p)?,
        None => EdgeConfig::default(),
    };
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = cli.shards {
        cfg.shards = v;
    }
    if let Some(v) = cli.admin {
        cfg.admin = v;
    }
    cfg.validate()?;
    if cli.check {
        let shards = cfg.resolved_shards(iris_edge::server::allowed_cpus().len());
        println!("# configuration is valid; effective values ({shards} shards):");
        print!("{}", toml::to_string(&cfg).context("cannot print config")?);
        return Ok(());
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone())
            .context("cannot install signal handler")?;
    }
    iris_edge::server::run(cfg, shutdown, |b| {
        println!(
            "iris-edge listening client={} admin={} shards={}",
            b.client, b.admin, b.shards
        );
    })
}
