//! `iris-core`: the core node of a regional cluster (see `iris_core::service`).
//!
//! `iris-core --brokers H:P --redis redis://H:P --region R --data-dir DIR [--partitions 16]
//! [--group iris-core-R] [--commit-window-ms 2] [--member 0 --members 1] [--admin ADDR]
//! [--fetch-wait-max-ms 5] [--regions a,b --global-brokers H:P [--home-table FILE]] [--check]`,
//! or the same keys in a TOML file given with `--config FILE` (flags win over the file; the
//! file keys of the last three are `regions`, `global_brokers`, `home_table_file`). Member `I` of
//! `N` consumes the deliver partitions `p` with `p % N == I`; each member keeps its own
//! `--data-dir` and must be restarted on it (a killed member's partitions wait for it).
//!
//! Once its partitions are assigned it prints exactly one line on stdout and flushes it:
//! `iris-core ready region=R member=I/N partitions=P assigned=a,b,c` (followed by
//! ` admin=ADDR`, the bound address, when `--admin` is given). It exits 0 on SIGTERM or SIGINT
//! after a durable commit of what it consumed; 2 on invalid flags (clap); 75 (`EX_TEMPFAIL`)
//! when the broker lost the region's topics and they were re-created (a memory-storage broker
//! restarted: its supervisor restarts it, and the new process reads the new logs from their
//! beginning); and 1 on any other startup or run error. Logs go to stderr (`RUST_LOG`, default `info`).
//!
//! `iris-core rehome --admin ADDR --user U` asks the core whose admin endpoint is `ADDR` to move
//! U's stored messages to U's new home (`POST /rehome?user=U`, docs/REGIONS.md "Changing a
//! user's home"), prints the answer and exits 0 when it was `200`, 1 otherwise.
//!
//! `--check` validates the configuration (the region list, the home table, which it loads, and
//! every other value), prints the effective configuration as TOML on stdout (a file `--config`
//! accepts) and exits 0, without connecting to anything; an invalid one exits 1 with the error
//! on stderr.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use iris_bus::home::Homes;
use iris_bus::kafka::KafkaConfig;
use iris_core::service::{CoreService, ServiceConfig};
use iris_core::CoreError;
use serde::{Deserialize, Serialize};

/// The exit status asking the supervisor for a restart (`EX_TEMPFAIL`): the broker lost the
/// region's topics, see [`CoreError::TopicsLost`].
const EXIT_RESTART: i32 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "iris-core",
    about = "Iris core node: stores, routes and drains messages"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with any of the keys below (brokers, redis, region, data_dir, partitions,
    /// group, commit_window_ms, member, members, admin, fetch_wait_max_ms, regions,
    /// global_brokers, home_table_file, dedup_ttl_secs, message_ttl_secs); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long)]
    brokers: Option<String>,
    /// Redis URL of the sessions, redis://host:port.
    #[arg(long)]
    redis: Option<String>,
    /// Region name ([a-z0-9-], not "global").
    #[arg(long)]
    region: Option<String>,
    /// Directory of the message store (this member's own).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Partitions of the deliver and presence topics when created here; an existing topic
    /// keeps its count [default: 16].
    #[arg(long)]
    partitions: Option<u32>,
    /// Consumer group that stores the committed offsets [default: iris-core-{region}].
    #[arg(long)]
    group: Option<String>,
    /// Group commit window in milliseconds [default: 2].
    #[arg(long)]
    commit_window_ms: Option<u64>,
    /// This process's index among the members: it consumes the deliver partitions p with
    /// p % members == member [default: 0].
    #[arg(long)]
    member: Option<u32>,
    /// How many iris-core processes share the region's deliver partitions [default: 1].
    #[arg(long)]
    members: Option<u32>,
    /// Admin endpoint address (GET /metrics, GET /health, POST /rehome?user=U), e.g.
    /// 127.0.0.1:9101; port 0 picks a free port [default: none].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Consumer fetch.wait.max.ms: the longest a fetch waits at the broker; tansu answers only
    /// at this deadline (5 suits it), a real Kafka as soon as data arrives (500 suits it)
    /// [default: 5].
    #[arg(long)]
    fetch_wait_max_ms: Option<u32>,
    /// The ordered region list of a federated deployment, comma separated (must contain
    /// --region; append only) [default: none, a single region].
    #[arg(long)]
    regions: Option<String>,
    /// Kafka bootstrap servers of the global bus; required with more than one region.
    #[arg(long)]
    global_brokers: Option<String>,
    /// Home table file: `user region` per line, overriding the rendezvous home of those users.
    #[arg(long)]
    home_table: Option<PathBuf>,
    /// How long a protocol v2 sender's client message id is remembered, in seconds: a resend
    /// within it is confirmed with the first id and never delivered twice; 0 keeps them
    /// forever [default: 86400].
    #[arg(long)]
    dedup_ttl_secs: Option<u64>,
    /// A stored message older than this many seconds is never drained and is deleted by a
    /// background sweep; 0 keeps messages until acked [default: 2592000, 30 days].
    #[arg(long)]
    message_ttl_secs: Option<u64>,
    /// Validate the configuration, print it as TOML, and exit.
    #[arg(long)]
    check: bool,
}

/// The TOML file; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    brokers: Option<String>,
    redis: Option<String>,
    region: Option<String>,
    data_dir: Option<PathBuf>,
    partitions: Option<u32>,
    group: Option<String>,
    commit_window_ms: Option<u64>,
    member: Option<u32>,
    members: Option<u32>,
    admin: Option<SocketAddr>,
    fetch_wait_max_ms: Option<u32>,
    regions: Option<Vec<String>>,
    global_brokers: Option<String>,
    home_table_file: Option<PathBuf>,
    dedup_ttl_secs: Option<u64>,
    message_ttl_secs: Option<u64>,
}

/// The effective configuration as `--check` prints it: the file's keys, every one set.
#[derive(Debug, Serialize)]
struct Effective {
    brokers: String,
    redis: String,
    region: String,
    data_dir: PathBuf,
    partitions: u32,
    group: String,
    commit_window_ms: u64,
    member: u32,
    members: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<SocketAddr>,
    fetch_wait_max_ms: u32,
    regions: Vec<String>,
    global_brokers: String,
    home_table_file: PathBuf,
    dedup_ttl_secs: u64,
    message_ttl_secs: u64,
}

/// `a,b, c` → `["a", "b", "c"]`; empty items are dropped, so "" is the empty list.
fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The homes of this configuration (loading the home table) and the global bus's config.
fn regions(
    region: &str,
    regions: &[String],
    global_brokers: &str,
    home_table: Option<&Path>,
    fetch_wait_max_ms: u32,
) -> anyhow::Result<(Homes, Option<KafkaConfig>)> {
    let table = match home_table {
        Some(p) => Homes::load_table(p)?,
        None => HashMap::new(),
    };
    let homes = Homes::new(region, regions, table)?;
    let global = if homes.is_multi() {
        if global_brokers.trim().is_empty() {
            bail!(
                "--global-brokers is required with more than one region (regions: {})",
                homes.regions().join(",")
            );
        }
        Some(KafkaConfig {
            brokers: global_brokers.to_owned(),
            linger_ms: 1,
            fetch_wait_max_ms,
            ..KafkaConfig::default()
        })
    } else {
        None
    };
    Ok((homes, global))
}

fn config(args: Args) -> anyhow::Result<(ServiceConfig, Effective)> {
    let file = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(brokers) = args.brokers.or(file.brokers) else {
        bail!("--brokers is required");
    };
    let Some(redis) = args.redis.or(file.redis) else {
        bail!("--redis is required");
    };
    let Some(region) = args.region.or(file.region) else {
        bail!("--region is required");
    };
    let Some(data_dir) = args.data_dir.or(file.data_dir) else {
        bail!("--data-dir is required");
    };
    if !iris_bus::topics::is_valid_region(&region) {
        bail!("invalid region {region:?}: 1-64 bytes of [a-z0-9-], not \"global\"");
    }
    let mut cfg = ServiceConfig::new(brokers, redis, region, data_dir);
    if let Some(p) = args.partitions.or(file.partitions) {
        if p == 0 {
            bail!("--partitions must be at least 1");
        }
        cfg.partitions = p;
    }
    if let Some(g) = args.group.or(file.group) {
        cfg.group = g;
    }
    if let Some(ms) = args.commit_window_ms.or(file.commit_window_ms) {
        cfg.commit_window = Duration::from_millis(ms);
    }
    cfg.member = args.member.or(file.member).unwrap_or(0);
    cfg.members = args.members.or(file.members).unwrap_or(1);
    if cfg.members == 0 {
        bail!("--members must be at least 1");
    }
    if cfg.member >= cfg.members {
        bail!(
            "--member {} out of range: it must be below --members {}",
            cfg.member,
            cfg.members
        );
    }
    cfg.admin = args.admin.or(file.admin);
    if let Some(secs) = args.dedup_ttl_secs.or(file.dedup_ttl_secs) {
        cfg.dedup_ttl_secs = secs;
    }
    if let Some(secs) = args.message_ttl_secs.or(file.message_ttl_secs) {
        cfg.message_ttl_secs = secs;
    }
    if let Some(ms) = args.fetch_wait_max_ms.or(file.fetch_wait_max_ms) {
        if ms == 0 {
            bail!("--fetch-wait-max-ms must be at least 1");
        }
        cfg.fetch_wait_max_ms = ms;
    }
    let region_list = match args.regions {
        Some(s) => split_list(&s),
        None => file.regions.unwrap_or_default(),
    };
    let global_brokers = args
        .global_brokers
        .or(file.global_brokers)
        .unwrap_or_default();
    let home_table = args
        .home_table
        .or(file.home_table_file)
        .filter(|p| !p.as_os_str().is_empty());
    let (homes, global) = regions(
        &cfg.region,
        &region_list,
        &global_brokers,
        home_table.as_deref(),
        cfg.fetch_wait_max_ms,
    )?;
    cfg.homes = Arc::new(homes);
    cfg.global = global;
    cfg.validate()?;
    let effective = Effective {
        brokers: cfg.brokers.clone(),
        redis: cfg.redis_url.clone(),
        region: cfg.region.clone(),
        data_dir: cfg.data_dir.clone(),
        partitions: cfg.partitions,
        group: cfg.group.clone(),
        commit_window_ms: cfg.commit_window.as_millis() as u64,
        member: cfg.member,
        members: cfg.members,
        admin: cfg.admin,
        fetch_wait_max_ms: cfg.fetch_wait_max_ms,
        regions: region_list,
        global_brokers,
        home_table_file: home_table.unwrap_or_default(),
        dedup_ttl_secs: cfg.dedup_ttl_secs,
        message_ttl_secs: cfg.message_ttl_secs,
    };
    Ok((cfg, effective))
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Moves a user's stored messages and prekeys to its new home: POST /rehome?user=U on the
    /// admin endpoint of the old home's core member that owns the user's partition, after the
    /// home table was changed and every process restarted.
    Rehome {
        /// Admin endpoint of that core member, host:port.
        #[arg(long)]
        admin: SocketAddr,
        /// The user id.
        #[arg(long)]
        user: String,
    },
}

/// `POST /rehome?user=U` on `admin`: prints the answer; Ok when it was 200.
fn rehome(admin: SocketAddr, user: &str) -> anyhow::Result<()> {
    use std::io::Read;
    let mut encoded = String::with_capacity(user.len());
    for b in user.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .with_context(|| format!("connecting to {admin}"))?;
    // The core answers within 120 s (504 if the move goes on).
    s.set_read_timeout(Some(Duration::from_secs(150)))?;
    write!(
        s,
        "POST /rehome?user={encoded} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("reading the answer of {admin}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map_or("", |(_, rest)| rest);
    print!("{body}");
    std::io::stdout().flush()?;
    if !status.starts_with("200") {
        bail!("rehome answered {status}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    if let Some(Command::Rehome { admin, user }) = args.command.take() {
        return rehome(admin, &user);
    }
    let check = args.check;
    let (cfg, effective) = config(args)?;
    if check {
        let text = toml::to_string(&effective).context("printing the configuration")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "# configuration is valid; effective values:")?;
        write!(out, "{text}")?;
        out.flush()?;
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
    }
    let service = CoreService::start(cfg).context("starting iris-core")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", service.ready_line()).context("writing the ready line")?;
        out.flush().context("flushing the ready line")?;
    }
    match service.run(&stop) {
        Err(e @ CoreError::TopicsLost { .. }) => {
            // Nothing is dropped: the consumer's librdkafka handle may hang when destroyed.
            tracing::error!(error = %e, "iris-core exits for a restart (status {EXIT_RESTART})");
            std::process::exit(EXIT_RESTART);
        }
        r => r.context("iris-core stopped on an error")?,
    }
    Ok(())
}
