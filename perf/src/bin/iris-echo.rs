//! `iris-echo`: the reference echo server that measures the loopback ceiling (see
//! `iris_perf::load::echo`). Prints `iris-echo listening ADDR` once serving; runs until killed.

use std::io::Write as _;
use std::net::SocketAddr;

use clap::Parser;
use iris_perf::load::echo::{serve, EchoConfig};

/// One pinned glommio core that writes back whatever it reads.
#[derive(Debug, Parser)]
#[command(name = "iris-echo", version, about)]
struct Cli {
    /// Listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CPU to pin to [default: unbound].
    #[arg(long)]
    cpu: Option<usize>,
    /// Registered I/O memory of the executor, bytes.
    #[arg(long, default_value_t = 256 << 10)]
    io_memory: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = EchoConfig {
        listen: cli.listen,
        cpu: cli.cpu,
        io_memory: cli.io_memory,
        ..EchoConfig::default()
    };
    serve(cfg, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "iris-echo listening {addr}");
        let _ = out.flush();
    })
}
