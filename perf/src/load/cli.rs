//! Command line of `iris-load`: one subcommand per scenario, shared options in [`Common`].
//!
//! [`main_with_args`] parses, runs the scenario, prints the final table on standard output and
//! writes `--json FILE`. [`run`] does the same without printing and returns the report, for
//! tests and other tools.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use super::bench_report::ReportOpts;
use super::conn::Protocol;
use super::report::Report;
use super::scenario::{connect, echo, logins, offline, pairs};
use super::transport::{Connector, TransportKind};

/// Iris load generator: thread-per-core, protocol v1 or v2 (TCP, TLS, WebSocket),
/// coordinated-omission-free latency.
#[derive(Debug, Parser)]
#[command(name = "iris-load", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Hold N logged-in idle connections, ramped at a set rate; connects/s and server memory
    /// per connection (with --server-pid).
    Connect(connect::ConnectOpts),
    /// P sender → receiver pairs at a constant open-loop rate (--rate) or as fast as the server
    /// takes them (--max); receivers ack; end-to-end latency from the intended send time.
    Pairs(pairs::PairsOpts),
    /// Fill N offline users' inboxes, then time the drain when they log in.
    Offline(offline::OfflineOpts),
    /// Login/logout churn.
    Logins(logins::LoginsOpts),
    /// Client of the reference echo server (`iris-echo`): the loopback ceiling.
    Echo(echo::EchoOpts),
    /// Draw charts and regenerate the tables of BENCHMARKS.md from result JSON files.
    Report(ReportOpts),
}

/// Options every load scenario takes.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Common {
    /// Server address, host:port (repeatable; connections are spread round-robin).
    #[arg(long = "target", default_value = "127.0.0.1:8085")]
    pub targets: Vec<String>,
    /// CPUs for the worker threads, one pinned executor each (e.g. `1` or `2-3`)
    /// [default: every CPU this process may use].
    #[arg(long)]
    pub cpus: Option<String>,
    /// Do not pin the workers to their CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Write the full report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run, recorded in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// Prefix of every user name [default: unique per run].
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Registered I/O memory per worker executor, bytes (counts against the memlock limit).
    #[arg(long, default_value_t = 256 << 10)]
    pub io_memory: usize,
    /// Busy-poll this many microseconds before an idle worker parks (0 = never spin).
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Connect timeout, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Make new connections from this many loopback addresses in turn (127.0.0.1, 127.0.0.2,
    /// …; every target must then be a 127.x.y.z address). Each source address has its own
    /// ephemeral ports: with 1 (the kernel's choice, the default) a loop of connect and close
    /// at thousands per second leaves tens of thousands of connections in TIME_WAIT, and the
    /// load generator's own `connect` spends its CPU searching them for a free port.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub source_ips: u8,
    /// Pid of the server: its memory and CPU time go into the report.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Client protocol: `v1` (shared/PROTOCOL.md) or `v2` (docs/PROTOCOL-v2.md; `--target` is
    /// then the edge's v2 address, `iris-edge --listen-v2`).
    #[arg(long, value_enum, default_value_t = Protocol::V1)]
    pub protocol: Protocol,
    /// Transport of protocol v2: `tcp`, `tls`, `ws` (WebSocket) or `wss` (WebSocket over TLS);
    /// `--target` is then the edge's listener of that transport (`--listen-v2-tls`, …).
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    pub transport: TransportKind,
    /// PEM file of the certificate(s) to trust for `--transport tls|wss` (the edge's
    /// self-signed certificate, or its CA).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS server name to check the certificate against, and the WebSocket request's host.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// TLS clients, each with its own session cache, which the connections use in turn: a
    /// connection resumes with a ticket its client got on an earlier one (a reconnecting
    /// device). 1: one client for the whole run (its cache keeps 8 tickets per server name).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tls_clients: u32,
    /// The edge's `[auth] secret`: every LOGIN (HELLO) then carries `user:token`, an HS256
    /// token for the user valid for a day (the `logins` step signs its pool in the warm-up, the
    /// other steps as they log in).
    #[arg(long)]
    pub jwt_secret: Option<String>,
    /// The `iss` claim of `--jwt-secret`'s tokens (the edge's `[auth] issuer`).
    #[arg(long, default_value = "iris")]
    pub jwt_issuer: String,
}

impl Common {
    /// The transport of the run's connections; only protocol v2 has others than TCP.
    pub fn connector(&self) -> anyhow::Result<Connector> {
        anyhow::ensure!(
            self.transport == TransportKind::Tcp || self.protocol == Protocol::V2,
            "--transport {:?} needs --protocol v2 (v1 is plain TCP only)",
            self.transport
        );
        Ok(
            Connector::new(self.transport, self.ca.as_deref(), &self.server_name)?
                .with_tls_clients(self.tls_clients as usize),
        )
    }

    /// The token maker of `--jwt-secret`, if given.
    pub fn tokens(&self) -> Option<super::conn::Tokens> {
        let secret = self.jwt_secret.as_ref()?;
        Some(super::conn::Tokens::new(secret, &self.jwt_issuer))
    }

    /// The local addresses of `--source-ips` (none for 1: the kernel chooses).
    pub fn source_addrs(&self) -> anyhow::Result<Vec<std::net::IpAddr>> {
        if self.source_ips <= 1 {
            return Ok(Vec::new());
        }
        for t in self.resolve_targets()? {
            anyhow::ensure!(
                matches!(t.ip(), std::net::IpAddr::V4(ip) if ip.is_loopback()),
                "--source-ips {} needs loopback IPv4 targets, not {t}",
                self.source_ips
            );
        }
        Ok((1..=self.source_ips)
            .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
            .collect())
    }

    /// Resolves every `--target`.
    pub fn resolve_targets(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let mut out = Vec::new();
        for t in &self.targets {
            let a = t
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve target {t}"))?
                .next()
                .with_context(|| format!("target {t} has no address"))?;
            out.push(a);
        }
        anyhow::ensure!(!out.is_empty(), "no --target");
        Ok(out)
    }
}

/// Runs the scenario of `cli` and returns its report (`None` for `report`). `command` is the
/// command line recorded in the report.
pub fn run(cli: Cli, command: Vec<String>) -> anyhow::Result<Option<Report>> {
    let r = match cli.scenario {
        Scenario::Connect(o) => connect::run(&o, command)?,
        Scenario::Pairs(o) => pairs::run(&o, command)?,
        Scenario::Offline(o) => offline::run(&o, command)?,
        Scenario::Logins(o) => logins::run(&o, command)?,
        Scenario::Echo(o) => echo::run(&o, command)?,
        Scenario::Report(o) => {
            super::bench_report::run(&o)?;
            return Ok(None);
        }
    };
    Ok(Some(r))
}

/// The whole program: parse `args`, run, print the table, write the JSON.
pub fn main_with_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = Cli::parse_from(args);
    let json = match &cli.scenario {
        Scenario::Connect(o) => o.common.json.clone(),
        Scenario::Pairs(o) => o.common.json.clone(),
        Scenario::Offline(o) => o.common.json.clone(),
        Scenario::Logins(o) => o.common.json.clone(),
        Scenario::Echo(o) => o.common.json.clone(),
        Scenario::Report(_) => None,
    };
    if let Some(report) = run(cli, command)? {
        print!("{}", report.table());
        if let Some(path) = json {
            report.write_json(&path)?;
            eprintln!("report written to {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Common;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        common: Common,
    }

    fn common(args: &[&str]) -> Common {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .common
    }

    /// `--source-ips N` names 127.0.0.1 to 127.0.0.N, only for loopback targets; 1 (the
    /// default) leaves the choice to the kernel; 0 is refused.
    #[test]
    fn source_ips_are_loopback_addresses_for_loopback_targets() {
        assert!(common(&[]).source_addrs().unwrap().is_empty());
        let c = common(&["--source-ips", "3", "--target", "127.0.0.1:1"]);
        let want: Vec<std::net::IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(c.source_addrs().unwrap(), want);
        let c = common(&["--source-ips", "2", "--target", "10.0.0.1:1"]);
        let e = c.source_addrs().unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(T::try_parse_from(["t", "--source-ips", "0"]).is_err());
    }
}
