//! `iris-edge` binary: flags and config file, host checks, then the shards until SIGTERM/SIGINT.
//! `--bus kafka` (with `--brokers`, `--redis`, `--region`, `--node-id`) joins a regional cluster
//! instead of running the embedded core; `--regions a,b --global-brokers H:P [--home-table FILE]`
//! make it one region of a federated deployment.
//!
//! Prints one line to standard output once serving, for scripts and tests:
//! `iris-edge listening client=ADDR admin=ADDR shards=N[ v2=ADDR][ v2tls=ADDR][ v2ws=ADDR]
//! [ v2wss=ADDR]` (each v2 key when its listener is set: `--listen-v2` / `[v2] listen`,
//! `--listen-v2-tls` / `tls_listen`, `--listen-v2-ws` / `ws_listen`, `--listen-v2-wss` /
//! `wss_listen`). SIGHUP reloads the v2 TLS certificate files. Logs go to standard error
//! (`RUST_LOG` filters them, default `info`): plain text, with ANSI colours only when standard
//! error is a terminal, or one JSON object per line with `--log-format json`.
//!
//! Exit status: 0 after SIGTERM/SIGINT once everything accepted is handed on (or kept in the
//! cluster outbox); 75 (`EX_TEMPFAIL`) in cluster mode when the broker lost the edge's topics
//! and they were re-created (a memory-storage broker restarted): the outbox is fsynced and the
//! supervisor is to start the edge again, which replays it and reads the new logs; 70 when a
//! thread panicked; 1 on any other error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use iris_edge::config::{BusKind, EdgeConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Iris edge: a thread-per-core v1 chat server.
#[derive(Debug, Parser)]
#[command(version, about, args_override_self = true)]
struct Cli {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Client listener address [default: 0.0.0.0:8085].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Protocol v2 listener address (`[v2] listen`) [default: none, no v2].
    #[arg(long)]
    listen_v2: Option<SocketAddr>,
    /// Protocol v2 over TLS listener address (`[v2] tls_listen`; needs `[v2] tls_cert_file`
    /// and `tls_key_file`) [default: none].
    #[arg(long)]
    listen_v2_tls: Option<SocketAddr>,
    /// Protocol v2 over WebSocket listener address (`[v2] ws_listen`) [default: none].
    #[arg(long)]
    listen_v2_ws: Option<SocketAddr>,
    /// Protocol v2 over WebSocket over TLS listener address (`[v2] wss_listen`; needs the TLS
    /// files) [default: none].
    #[arg(long)]
    listen_v2_wss: Option<SocketAddr>,
    /// Data directory of the embedded store [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of shards [default: one per CPU this process may use].
    #[arg(long)]
    shards: Option<usize>,
    /// Admin HTTP address for /metrics and /health [default: 127.0.0.1:9085].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Core to use: `embedded` (one box) or `kafka` (a regional cluster) [default: embedded].
    #[arg(long, value_parser = ["embedded", "kafka"])]
    bus: Option<String>,
    /// Cluster: Kafka bootstrap servers, host:port[,host:port].
    #[arg(long)]
    brokers: Option<String>,
    /// Cluster: Redis URL of the sessions, redis://host:port.
    #[arg(long)]
    redis: Option<String>,
    /// Cluster: region name ([a-z0-9-], not "global").
    #[arg(long)]
    region: Option<String>,
    /// Cluster: this edge's node id in the region (0-255).
    #[arg(long)]
    node_id: Option<u32>,
    /// Cluster: partitions of the deliver and presence topics if this edge creates them.
    #[arg(long)]
    partitions: Option<u32>,
    /// Cluster: the ordered region list of a federated deployment, comma separated (must
    /// contain --region; append only) [default: none, a single region].
    #[arg(long)]
    regions: Option<String>,
    /// Cluster: Kafka bootstrap servers of the global bus; required with more than one region.
    #[arg(long)]
    global_brokers: Option<String>,
    /// Cluster: home table file, `user region` per line, overriding the rendezvous home of
    /// those users.
    #[arg(long)]
    home_table: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check: bool,
    /// Log format on standard error: `text` (colours only on a terminal) or `json` (one
    /// object per line).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable text; ANSI colours only when standard error is a terminal.
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log shippers.
    Json,
}

/// Installs the log subscriber: `RUST_LOG` filters (default `info`).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    iris_edge::server::install_fatal_panic_hook();
    let mut cfg = match &cli.config {
        Some(p) => EdgeConfig::load(p)?,
        None => EdgeConfig::default(),
    };
    if let Some(v) = cli.listen_v2 {
        cfg.v2.listen = Some(v);
    }
    if let Some(v) = cli.listen_v2_tls {
        cfg.v2.tls_listen = Some(v);
    }
    if let Some(v) = cli.listen_v2_ws {
        cfg.v2.ws_listen = Some(v);
    }
    if let Some(v) = cli.listen_v2_wss {
        cfg.v2.wss_listen = Some(v);
    }
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
    if let Some(v) = cli.bus {
        cfg.cluster.bus = if v == "kafka" {
            BusKind::Kafka
        } else {
            BusKind::Embedded
        };
    }
    if let Some(v) = cli.brokers {
        cfg.cluster.brokers = v;
    }
    if let Some(v) = cli.redis {
        cfg.cluster.redis_url = v;
    }
    if let Some(v) = cli.region {
        cfg.cluster.region = v;
    }
    if let Some(v) = cli.node_id {
        cfg.cluster.node_id = v;
    }
    if let Some(v) = cli.partitions {
        cfg.cluster.partitions = v;
    }
    if let Some(v) = cli.regions {
        cfg.cluster.regions = v
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
    }
    if let Some(v) = cli.global_brokers {
        cfg.cluster.global_brokers = v;
    }
    if let Some(v) = cli.home_table {
        cfg.cluster.home_table_file = v.to_string_lossy().into_owned();
    }
    cfg.validate()?;
    if cli.check {
        let shards = cfg.resolved_shards(iris_edge::server::allowed_cpus().len());
        println!("# configuration is valid; effective values ({shards} shards):");
        let mut shown = cfg.clone();
        if !shown.auth.secret.is_empty() {
            // Never print the JWT secret (it lands in terminals, CI logs and tickets).
            shown.auth.secret = format!("<redacted: {} bytes>", cfg.auth.secret.len());
        }
        print!(
            "{}",
            toml::to_string(&shown).context("cannot print config")?
        );
        return Ok(());
    }
    // A write past RLIMIT_FSIZE must fail that write with EFBIG (the store then fails the
    // messages of that commit, see iris_core::embedded), not kill the whole process with
    // SIGXFSZ's default action.
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it runs
    // before any other thread of ours exists.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        anyhow::bail!("cannot ignore SIGXFSZ: {}", std::io::Error::last_os_error());
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone())
            .context("cannot install signal handler")?;
    }
    let result = iris_edge::server::run(cfg, shutdown, |b| {
        let mut extra = String::new();
        for (key, addr) in [
            ("v2", b.v2),
            ("v2tls", b.v2_tls),
            ("v2ws", b.v2_ws),
            ("v2wss", b.v2_wss),
        ] {
            if let Some(a) = addr {
                extra.push_str(&format!(" {key}={a}"));
            }
        }
        println!(
            "iris-edge listening client={} admin={} shards={}{extra}",
            b.client, b.admin, b.shards
        );
    });
    if let Err(e) = &result {
        if let Some(lost) = e.downcast_ref::<iris_edge::server::TopicsLost>() {
            // Nothing of librdkafka is destroyed: a client that saw its topic re-created can
            // hang there. What was accepted is fsynced in the outbox.
            tracing::error!(
                error = %lost,
                "iris-edge exits for a restart (status {})",
                iris_edge::server::TOPICS_LOST_EXIT
            );
            std::process::exit(iris_edge::server::TOPICS_LOST_EXIT);
        }
    }
    result
}
