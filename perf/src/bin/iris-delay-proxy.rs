//! `iris-delay-proxy`: a TCP proxy that holds every chunk `--delay-ms` in each direction, in
//! order and unchanged (see `iris_perf::proxy`). Prints `iris-delay-proxy listening ADDR
//! upstream=HOST:PORT delay_ms=N` on stdout once bound; exits 0 on SIGTERM or SIGINT.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use iris_perf::proxy::{run, ProxyConfig, ProxyStats};

/// A delaying TCP proxy (plays the distance between regions on one host).
#[derive(Debug, Parser)]
#[command(name = "iris-delay-proxy", version, about)]
struct Cli {
    /// Listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where connections are forwarded, HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Delay added to every chunk in each direction, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone())
            .context("cannot install signal handler")?;
    }
    let cfg = ProxyConfig {
        listen: cli.listen,
        upstream: cli.upstream.clone(),
        delay: Duration::from_millis(cli.delay_ms),
    };
    let stats = Arc::new(ProxyStats::default());
    run(&cfg, &shutdown, &stats, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "iris-delay-proxy listening {addr} upstream={} delay_ms={}",
            cli.upstream, cli.delay_ms
        );
        let _ = out.flush();
    })?;
    tracing::info!(
        accepted = stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
        bytes = stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
        "stopped"
    );
    Ok(())
}
