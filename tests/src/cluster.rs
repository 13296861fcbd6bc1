//! A whole local region per test: a tansu broker ([`Tansu`], memory or sqlite storage), a
//! `redis-server` ([`RedisServer`]), `iris-core` members ([`CoreNode`], static partition
//! ownership: member `i` of `n` owns the deliver partitions `p % n == i`, each with its own data
//! directory) and `iris-edge` processes in cluster mode ([`Server`] with `--bus kafka ...`, node
//! ids `1..=M`). Everything listens on free loopback ports (port 0 where the process supports
//! it) and the region name is unique per test, so tests share nothing and run in parallel.
//!
//! Every part can be killed (`kill -9`) and restarted on its own state: an edge keeps its node
//! id (and gets new ports), a core its member index and data directory, a sqlite broker its
//! file, Redis comes back empty (no persistence, as in `scripts/redis.sh start`).
//!
//! Several regions ([`Regions`]): one global broker (sqlite tansu, killable, optionally behind
//! an `iris-delay-proxy`) and one [`Cluster`] per region, each started with the region list
//! (`--regions`), the global brokers (`--global-brokers`) and optionally a home table
//! (`--home-table`); [`rendezvous`] and [`user_homed_in`] pick user names homed in a given
//! region exactly as the bus does (`iris_bus::home`).
//!
//! When a test panics, the logs of every process are printed: each edge's stderr (by
//! [`Server`]'s drop), each core's stderr (by [`CoreNode`]'s drop) and the broker's log (by
//! [`Cluster`]'s drop).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::services::{RedisServer, Tansu};
use crate::{core_bin, http_get, metric_value, unique, Client, Server, ServerOpts};

/// How long [`CoreNode`] waits for its `iris-core ready` line.
pub const CORE_START_TIMEOUT: Duration = Duration::from_secs(40);

/// The broker's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrokerStorage {
    /// `memory://` (lost when the broker stops).
    #[default]
    Memory,
    /// A sqlite file kept across [`Cluster::restart_broker`].
    Sqlite,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// `iris-edge` processes (node ids `1..=edges`).
    pub edges: usize,
    /// `iris-core` members.
    pub cores: u32,
    /// Partitions of the deliver and presence topics (`--partitions` of every process).
    pub partitions: u32,
    /// Shards per edge.
    pub shards: usize,
    /// Broker storage.
    pub broker: BrokerStorage,
    /// Extra arguments of every edge.
    pub edge_args: Vec<String>,
    /// TOML config file of every edge (`--config`), e.g. `[cluster]\nbus_stall_ms = 2000`.
    pub edge_config: Option<String>,
    /// Extra arguments of every core.
    pub core_args: Vec<String>,
    /// The region name; `None` = a random name unique per test (`t{pid}-{n}`). Must be
    /// `[a-z0-9-]`, 1–64 characters, not `global`.
    pub region: Option<String>,
    /// The region list (`--regions a,b` on every edge and core); empty = single region (the flag
    /// is not passed).
    pub regions: Vec<String>,
    /// The global brokers (`--global-brokers`), passed when set.
    pub global_brokers: Option<String>,
    /// The home table file (`--home-table`), passed when set (see [`write_home_table`]).
    pub home_table: Option<PathBuf>,
    /// Environment of every edge and core; by default `RUST_LOG` without the edge's host
    /// checks and the store's info lines, and `NO_COLOR` (plain logs).
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOpts {
    /// Two edges of two shards, two cores, four partitions, memory broker.
    fn default() -> Self {
        ClusterOpts {
            edges: 2,
            cores: 2,
            partitions: 4,
            shards: 2,
            broker: BrokerStorage::Memory,
            edge_args: Vec::new(),
            edge_config: None,
            core_args: Vec::new(),
            region: None,
            regions: Vec::new(),
            global_brokers: None,
            home_table: None,
            env: vec![
                (
                    "RUST_LOG".to_owned(),
                    "info,iris_tuning=warn,fjall=warn,lsm_tree=warn".to_owned(),
                ),
                ("NO_COLOR".to_owned(), "1".to_owned()),
            ],
        }
    }
}

/// The 64-bit FNV-1a hash of a user id (the one user hash of Iris, `iris_bus::topics::user_hash`,
/// written again here so the harness does not link the bus).
pub fn user_hash(user: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in user {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The deliver (and presence) partition of `user` among `partitions`.
pub fn partition_of(user: &[u8], partitions: u32) -> u32 {
    (user_hash(user) % u64::from(partitions.max(1))) as u32
}

/// The region flags of every edge and core of a cluster: `--regions a,b` when the list is not
/// empty, `--global-brokers X` and `--home-table F` when set; nothing for a single region.
pub fn region_args(opts: &ClusterOpts) -> Vec<String> {
    let mut args = Vec::new();
    if !opts.regions.is_empty() {
        args.push("--regions".to_owned());
        args.push(opts.regions.join(","));
    }
    if let Some(g) = &opts.global_brokers {
        args.push("--global-brokers".to_owned());
        args.push(g.clone());
    }
    if let Some(f) = &opts.home_table {
        args.push("--home-table".to_owned());
        args.push(f.display().to_string());
    }
    args
}

/// The splitmix64 finalizer (`iris_bus::home`'s mix).
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x
}

/// The rendezvous (highest random weight) home of `user` among `regions`, as
/// `iris_bus::home::rendezvous` (written again here so the harness does not link the bus): per
/// region `r`, score = mix64(fnv1a64(r) ^ fnv1a64(user)); the highest wins, ties to the name
/// that sorts first. `None` for an empty list.
pub fn rendezvous<'a>(user: &[u8], regions: &'a [String]) -> Option<&'a str> {
    let u = user_hash(user);
    let mut best: Option<(u64, &'a str)> = None;
    for r in regions {
        let score = mix64(user_hash(r.as_bytes()) ^ u);
        best = match best {
            Some((s, name)) if s > score || (s == score && name <= r.as_str()) => Some((s, name)),
            _ => Some((score, r.as_str())),
        };
    }
    best.map(|(_, name)| name)
}

/// The first name `{prefix}-{k}` (k = 0, 1, ...) that [`rendezvous`] homes in `region` among
/// `regions`. Make `prefix` unique (e.g. [`crate::unique`]) when users must not repeat.
///
/// # Panics
/// When `region` is not in `regions`.
pub fn user_homed_in(prefix: &str, region: &str, regions: &[String]) -> String {
    users_homed_in(prefix, region, regions, 1).remove(0)
}

/// The first `n` names `{prefix}-{k}` (k = 0, 1, ...) that [`rendezvous`] homes in `region`.
///
/// # Panics
/// When `region` is not in `regions`.
pub fn users_homed_in(prefix: &str, region: &str, regions: &[String], n: usize) -> Vec<String> {
    assert!(
        regions.iter().any(|r| r == region),
        "{region} is not in {regions:?}"
    );
    (0u64..)
        .map(|k| format!("{prefix}-{k}"))
        .filter(|u| rendezvous(u.as_bytes(), regions) == Some(region))
        .take(n)
        .collect()
}

/// Writes a home table file (`user region` per line, the format `--home-table` reads) with a
/// comment line first.
pub fn write_home_table<U: AsRef<str>, R: AsRef<str>>(path: &Path, entries: &[(U, R)]) {
    let mut text = String::from("# user region (written by the test harness)\n");
    for (u, r) in entries {
        text.push_str(u.as_ref());
        text.push(' ');
        text.push_str(r.as_ref());
        text.push('\n');
    }
    std::fs::write(path, text)
        .unwrap_or_else(|e| panic!("cannot write home table {}: {e}", path.display()));
}

/// `n` region names unique per test run: `t{pid}-{k}a`, `t{pid}-{k}b`, ... (`k` a per-process
/// counter), valid region names.
pub fn region_names(n: usize) -> Vec<String> {
    assert!((1..=16).contains(&n), "1 to 16 regions, not {n}");
    let k = unique("r").replace("r-", "");
    (0..n)
        .map(|i| format!("t{}-{k}{}", std::process::id(), (b'a' + i as u8) as char))
        .collect()
}

/// A running (or stopped) `iris-core` member.
pub struct CoreNode {
    child: Option<Child>,
    /// This member's index.
    pub member: u32,
    /// Members in the region.
    pub members: u32,
    /// Partitions of the deliver topic, as announced.
    pub partitions: u32,
    /// Deliver partitions this member owns, as announced.
    pub assigned: Vec<u32>,
    /// Admin endpoint (`/metrics`, `/health`), as announced.
    pub admin: Option<SocketAddr>,
    /// The last ready line.
    pub ready_line: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: PathBuf,
    log_path: PathBuf,
    generation: u32,
    root: tempfile::TempDir,
}

impl fmt::Debug for CoreNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreNode")
            .field("member", &self.member)
            .field("members", &self.members)
            .field("assigned", &self.assigned)
            .field("admin", &self.admin)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl CoreNode {
    /// Starts member `member` of `members` with these arguments (brokers, redis, region,
    /// partitions...; the harness adds `--data-dir`, `--member`, `--members`, `--admin
    /// 127.0.0.1:0`) and waits for its ready line.
    pub fn start(
        member: u32,
        members: u32,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> CoreNode {
        let root = tempfile::Builder::new()
            .prefix("iris-core-test-")
            .tempdir()
            .expect("tempdir");
        let mut c = CoreNode {
            child: None,
            member,
            members,
            partitions: 0,
            assigned: Vec::new(),
            admin: None,
            ready_line: String::new(),
            args,
            env,
            data_dir: root.path().join("data"),
            log_path: root.path().join("iris-core.stderr.log"),
            generation: 0,
            root,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "iris-core is still running");
        self.generation += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        writeln!(
            log,
            "==== iris-core member {}/{} start #{} ====",
            self.member, self.members, self.generation
        )
        .expect("write log");
        let mut cmd = Command::new(core_bin());
        cmd.args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--member", &self.member.to_string()])
            .args(["--members", &self.members.to_string()])
            .args(["--admin", "127.0.0.1:0"]);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn iris-core");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + CORE_START_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.starts_with("iris-core ready ") => break line,
                Ok(_) | Err(_) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "iris-core member {}/{} exited before its ready line ({status}); stderr:\n{}",
                    self.member,
                    self.members,
                    self.log_tail(8000)
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "iris-core member {}/{} printed no ready line within {CORE_START_TIMEOUT:?}; \
                     stderr:\n{}",
                    self.member,
                    self.members,
                    self.log_tail(8000)
                );
            }
        };
        let field = |name: &str| -> Option<String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let member = field("member=").unwrap_or_else(|| panic!("no member= in {line:?}"));
        assert_eq!(
            member,
            format!("{}/{}", self.member, self.members),
            "ready line {line:?}"
        );
        self.partitions = field("partitions=")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no partitions= in {line:?}"));
        self.assigned = field("assigned=")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("assigned partition"))
            .collect();
        self.admin = field("admin=").map(|a| a.parse().expect("admin address"));
        self.ready_line = line;
        self.child = Some(child);
    }

    /// The process id (panics if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("iris-core is not running").id()
    }

    /// This member's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics (with the log) unless the process is running.
    pub fn assert_running(&mut self) {
        match &mut self.child {
            Some(c) => {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "iris-core member {}/{} died ({status}); stderr:\n{}",
                        self.member,
                        self.members,
                        self.log_tail(8000)
                    );
                }
            }
            None => panic!("iris-core member {} is not running", self.member),
        }
    }

    /// The exit status if the process has exited (it is reaped and [`CoreNode::restart`] may
    /// start it again); `None` while it runs or when it was not running.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("iris-core is not running");
        child.kill().expect("kill -9");
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("iris-core is not running");
        // SAFETY: kill(2) with the pid of our own child, which we have not reaped yet.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM iris-core");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "iris-core did not exit within 20 s of SIGTERM; stderr:\n{}",
                    self.log_tail(8000)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the process again on the same data directory and member index; it must be
    /// stopped.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The `/metrics` text of the admin endpoint.
    pub fn metrics(&self) -> String {
        let admin = self.admin.expect("iris-core announced no admin address");
        let (code, body) = http_get(admin, "/metrics");
        assert_eq!(code, 200, "iris-core /metrics answered {code}: {body}");
        body
    }

    /// The value of the metric whose full key (name and labels) is `key`, e.g.
    /// `iris_core_delivers_total` or `iris_core_bus_frames_total{outcome="invalid"}`.
    pub fn metric(&self, key: &str) -> u64 {
        let text = self.metrics();
        metric_value(&text, key, None)
            .unwrap_or_else(|| panic!("metric {key} not found in iris-core /metrics:\n{text}"))
    }

    /// Everything the process wrote to standard error, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` bytes of [`CoreNode::log`].
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// The temporary directory of this member (log, data).
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for CoreNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let n = crate::failure_log_bytes();
            eprintln!(
                "---- iris-core member {}/{} stderr ({}), last {n} bytes ----\n{}",
                self.member,
                self.members,
                self.log_path.display(),
                self.log_tail(n)
            );
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// A local region: broker, Redis, cores and edges, all owned by one test.
///
/// Fields drop in order: edges, then cores, then Redis and the broker.
pub struct Cluster {
    /// The region name (unique per test).
    pub region: String,
    /// The edges; `edges[i]` is node `i + 1`.
    pub edges: Vec<Server>,
    /// The cores; `cores[i]` is member `i`.
    pub cores: Vec<CoreNode>,
    /// Redis (sessions).
    pub redis: RedisServer,
    /// The broker.
    pub broker: Tansu,
    /// How it was started.
    pub opts: ClusterOpts,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("region", &self.region)
            .field("brokers", &self.broker.brokers())
            .field("redis", &self.redis.url())
            .field("edges", &self.edges)
            .field("cores", &self.cores)
            .finish()
    }
}

impl Cluster {
    /// Starts a region: broker and Redis, then every core (in parallel, each until its ready
    /// line), then every edge (in parallel, each until its listening line and every shard
    /// accepts).
    pub fn start(opts: ClusterOpts) -> Cluster {
        assert!(opts.cores >= 1 && opts.edges >= 1, "{opts:?}");
        let region = opts.region.clone().unwrap_or_else(|| {
            format!("t{}-{}", std::process::id(), unique("r").replace("r-", ""))
        });
        let broker = match opts.broker {
            BrokerStorage::Memory => Tansu::memory(),
            BrokerStorage::Sqlite => Tansu::sqlite(),
        };
        let redis = RedisServer::start();
        let common = vec![
            "--brokers".to_owned(),
            broker.brokers(),
            "--redis".to_owned(),
            redis.url(),
            "--region".to_owned(),
            region.clone(),
            "--partitions".to_owned(),
            opts.partitions.to_string(),
        ];
        let mut common = common;
        common.extend(region_args(&opts));
        let cores: Vec<CoreNode> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..opts.cores)
                .map(|i| {
                    let mut args = common.clone();
                    args.extend(opts.core_args.iter().cloned());
                    let env = opts.env.clone();
                    let n = opts.cores;
                    s.spawn(move || CoreNode::start(i, n, args, env))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let edges: Vec<Server> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=opts.edges)
                .map(|node| {
                    let mut args = vec!["--bus".to_owned(), "kafka".to_owned()];
                    args.extend(common.iter().cloned());
                    args.extend(["--node-id".to_owned(), node.to_string()]);
                    args.extend(opts.edge_args.iter().cloned());
                    let so = ServerOpts {
                        shards: opts.shards,
                        config: opts.edge_config.clone(),
                        env: opts.env.clone(),
                        args,
                        ..ServerOpts::default()
                    };
                    s.spawn(move || Server::start(so))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        Cluster {
            region,
            edges,
            cores,
            redis,
            broker,
            opts,
        }
    }

    /// The default region: two edges, two cores.
    pub fn default_region() -> Cluster {
        Cluster::start(ClusterOpts::default())
    }

    /// Edge `i` (0-based; node id `i + 1`).
    pub fn edge(&self, i: usize) -> &Server {
        &self.edges[i]
    }

    /// A new connection to edge `i`, logged in as `user` (LOGIN_OK checked).
    pub fn login(&self, edge: usize, user: &str) -> Client {
        self.edges[edge].login(user)
    }

    /// `kill -9` edge `i`.
    pub fn kill9_edge(&mut self, i: usize) {
        self.edges[i].kill9();
    }

    /// Restarts edge `i` (same node id and data directory, new ports).
    pub fn restart_edge(&mut self, i: usize) {
        self.edges[i].restart();
    }

    /// The member that owns `user`'s deliver partition.
    pub fn core_of(&self, user: &str) -> usize {
        (partition_of(user.as_bytes(), self.opts.partitions) % self.opts.cores) as usize
    }

    /// The sum of metric `key` over every running core.
    pub fn core_metric(&mut self, key: &str) -> u64 {
        self.cores
            .iter_mut()
            .filter_map(|c| c.is_running().then(|| c.metric(key)))
            .sum()
    }

    /// The summed (unlabelled) value of `name` on edge `i`'s `/metrics`.
    pub fn edge_metric(&self, i: usize, name: &str) -> u64 {
        self.edges[i].metric(name)
    }

    /// The value of metric `key` (full key, with labels) on core `member`; 0 when the core does
    /// not list it (yet).
    pub fn core_metric_of(&self, member: usize, key: &str) -> u64 {
        metric_value(&self.cores[member].metrics(), key, None).unwrap_or(0)
    }

    /// The sum of metric `key` (full key, with labels) over every running core; 0 for a core
    /// that does not list it (yet), unlike [`Cluster::core_metric`].
    pub fn core_metric_or_zero(&mut self, key: &str) -> u64 {
        self.cores
            .iter_mut()
            .filter_map(|c| {
                c.is_running()
                    .then(|| metric_value(&c.metrics(), key, None).unwrap_or(0))
            })
            .sum()
    }

    /// The sum of metric `key` (full key, with labels, e.g.
    /// `iris_edge_routed_out_total{region="x"}`) over every edge; 0 for an edge that does not
    /// list it (yet).
    pub fn edges_metric(&self, key: &str) -> u64 {
        self.edges
            .iter()
            .map(|e| metric_value(&e.metrics(), key, None).unwrap_or(0))
            .sum()
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage (kept only
    /// with [`BrokerStorage::Sqlite`]).
    pub fn restart_broker(&mut self) {
        self.broker.restart();
    }

    /// Freezes the broker (SIGSTOP): its sockets stay open and accept bytes, nothing is
    /// answered, as a hung or GC-paused broker. [`Cluster::cont_broker`] resumes it.
    pub fn stop_broker(&mut self) {
        self.signal_broker(libc::SIGSTOP);
    }

    /// Resumes a broker frozen by [`Cluster::stop_broker`] (SIGCONT).
    pub fn cont_broker(&mut self) {
        self.signal_broker(libc::SIGCONT);
    }

    fn signal_broker(&mut self, sig: i32) {
        let pid = self.broker.pid().expect("the broker is not running") as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own child (the broker), which we have not reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) of the broker failed");
    }

    /// Kills Redis and starts a fresh, empty one on the same port.
    pub fn restart_redis(&mut self) {
        self.redis.restart();
    }

    /// Waits (at most 10 s) until every edge has consumed at least one record per edge of the
    /// region (each edge announces an `EdgeReset` at startup): from then on the startup
    /// announcements no longer race with the presence events of new logins. Call it right after
    /// [`Cluster::start`], before logins whose presence a test checks (the race itself is what
    /// `presence_of_users_who_log_in_right_after_an_edge_restart` checks). Returns whether it
    /// happened.
    pub fn wait_startup_presence(&self) -> bool {
        let n = self.edges.len() as u64;
        crate::wait_until(Duration::from_secs(10), || {
            (0..self.edges.len()).all(|i| self.edge_metric(i, "iris_bus_frames_in_total") >= n)
        })
    }

    /// Panics (with the log) unless every edge and core still runs.
    pub fn assert_running(&mut self) {
        for e in &mut self.edges {
            e.assert_running();
        }
        for c in &mut self.cores {
            c.assert_running();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- cluster region {} (brokers {}, redis {}) ----",
                self.region,
                self.broker.brokers(),
                self.redis.url()
            );
            eprintln!(
                "---- tansu log, last 4000 bytes ----\n{}",
                tail(&self.broker.log(), 4000)
            );
        }
    }
}

/// How to start [`Regions`] beyond the per-region [`ClusterOpts`].
#[derive(Debug, Clone, Default)]
pub struct RegionsOpts {
    /// Options of every region; `region`, `regions` and `global_brokers` are set by
    /// [`Regions::start_with`], `home_table` is kept unless [`RegionsOpts::home_table`] is not
    /// empty.
    pub cluster: ClusterOpts,
    /// Puts an `iris-delay-proxy` holding every chunk this many ms each way in front of the
    /// global broker, which then advertises the proxy's address: every region reaches the global
    /// bus through the same delay (a cross-region frame pays it on the produce and on the
    /// import's fetch).
    pub global_delay_ms: Option<u64>,
    /// Home table entries `(user, region)`; when not empty they are written to a file given to
    /// every edge and core as `--home-table`, and [`Regions::home_of`] reads them first.
    pub home_table: Vec<(String, String)>,
}

/// Several regions on one host: one global broker (sqlite tansu, so it survives `kill -9` and
/// [`Regions::restart_global`]), optionally behind a delay proxy, and one [`Cluster`] per region
/// (own broker, Redis, cores, edges), all started with the same region list and global brokers.
///
/// Fields drop in order: the regions' processes first, then the proxy and the global broker.
pub struct Regions {
    /// The region list, in order (a region's index is its position).
    pub names: Vec<String>,
    /// `clusters[i]` is region `names[i]`.
    pub clusters: Vec<Cluster>,
    /// The delay proxy in front of the global broker, when asked for.
    pub proxy: Option<crate::services::DelayProxy>,
    /// The global broker.
    pub global: Tansu,
    /// The home table file, when entries were given.
    pub home_table: Option<PathBuf>,
    table: std::collections::HashMap<String, String>,
    _dir: tempfile::TempDir,
}

impl fmt::Debug for Regions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Regions")
            .field("names", &self.names)
            .field("global", &self.global.brokers())
            .field("global_brokers", &self.global_brokers())
            .field("clusters", &self.clusters)
            .finish()
    }
}

impl Regions {
    /// Starts the global broker, then every region (in parallel) with `opts` (see
    /// [`Regions::start_with`]). `names` must be valid region names, e.g. [`region_names`].
    pub fn start(names: &[String], opts: ClusterOpts) -> Regions {
        Regions::start_with(
            names,
            RegionsOpts {
                cluster: opts,
                ..RegionsOpts::default()
            },
        )
    }

    /// [`Regions::start`] with a delay proxy and/or a home table.
    pub fn start_with(names: &[String], opts: RegionsOpts) -> Regions {
        assert!(!names.is_empty(), "at least one region");
        let dir = tempfile::Builder::new()
            .prefix("iris-regions-test-")
            .tempdir()
            .expect("tempdir");
        let (global, proxy) = match opts.global_delay_ms {
            None => (Tansu::sqlite(), None),
            Some(ms) => {
                let proxy_port = crate::services::free_port();
                let global = Tansu::sqlite_advertising(proxy_port);
                let proxy = crate::services::DelayProxy::start(proxy_port, &global.brokers(), ms);
                (global, Some(proxy))
            }
        };
        let global_brokers = match &proxy {
            Some(p) => p.addr(),
            None => global.brokers(),
        };
        let mut table = std::collections::HashMap::new();
        let mut home_table = opts.cluster.home_table.clone();
        if !opts.home_table.is_empty() {
            let path = dir.path().join("home-table.txt");
            write_home_table(&path, &opts.home_table);
            for (u, r) in &opts.home_table {
                table.insert(u.clone(), r.clone());
            }
            home_table = Some(path);
        }
        let clusters: Vec<Cluster> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    let mut o = opts.cluster.clone();
                    o.region = Some(name.clone());
                    o.regions = names.to_vec();
                    o.global_brokers = Some(global_brokers.clone());
                    o.home_table = home_table.clone();
                    s.spawn(move || Cluster::start(o))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        Regions {
            names: names.to_vec(),
            clusters,
            proxy,
            global,
            home_table,
            table,
            _dir: dir,
        }
    }

    /// Region `i` (its name is `names[i]`).
    pub fn region(&self, i: usize) -> &Cluster {
        &self.clusters[i]
    }

    /// Region `i`, mutably (to kill and restart its parts).
    pub fn region_mut(&mut self, i: usize) -> &mut Cluster {
        &mut self.clusters[i]
    }

    /// The index of region `name`.
    ///
    /// # Panics
    /// When there is no such region.
    pub fn index_of(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no region {name} in {:?}", self.names))
    }

    /// What every process was given as `--global-brokers` (the proxy when there is one).
    pub fn global_brokers(&self) -> String {
        match &self.proxy {
            Some(p) => p.addr(),
            None => self.global.brokers(),
        }
    }

    /// The home of `user`: the home table's entry, else [`rendezvous`] over the region list.
    pub fn home_of(&self, user: &str) -> &str {
        match self.table.get(user) {
            Some(r) => r,
            None => rendezvous(user.as_bytes(), &self.names).expect("regions"),
        }
    }

    /// The index of the home region of `user`.
    pub fn home_index(&self, user: &str) -> usize {
        self.index_of(self.home_of(user))
    }

    /// A new user name (unique per test run, from `prefix`) homed in region `i`.
    pub fn user_homed_in(&self, i: usize, prefix: &str) -> String {
        self.users_homed_in(i, prefix, 1).remove(0)
    }

    /// `n` new user names (unique per test run, from `prefix`) homed in region `i` by
    /// rendezvous and not named in the home table.
    pub fn users_homed_in(&self, i: usize, prefix: &str, n: usize) -> Vec<String> {
        let p = unique(prefix);
        let region = &self.names[i];
        (0u64..)
            .map(|k| format!("{p}-{k}"))
            .filter(|u| !self.table.contains_key(u) && self.home_of(u) == region)
            .take(n)
            .collect()
    }

    /// `kill -9` of the global broker. A delay proxy in front of it keeps running: it accepts
    /// connections and closes each at once (upstream refused) until [`Regions::restart_global`].
    pub fn kill9_global(&mut self) {
        self.global.kill();
    }

    /// Starts the global broker again on the same port and sqlite file (kills it first if it
    /// runs).
    pub fn restart_global(&mut self) {
        self.global.restart();
    }

    /// Panics (with the log) unless every edge and core of every region still runs.
    pub fn assert_running(&mut self) {
        for c in &mut self.clusters {
            c.assert_running();
        }
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- global broker {} (given as {}), tansu log, last 4000 bytes ----\n{}",
                self.global.brokers(),
                self.global_brokers(),
                tail(&self.global.log(), 4000)
            );
        }
    }
}

/// `HGETALL key` on the Redis server at `127.0.0.1:port` (a minimal RESP client, so the
/// harness needs no Redis library): the field-value pairs, empty for a missing key.
pub fn redis_hgetall(port: u16, key: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = b"*2\r\n$7\r\nHGETALL\r\n".to_vec();
    cmd.extend_from_slice(format!("${}\r\n", key.len()).as_bytes());
    cmd.extend_from_slice(key);
    cmd.extend_from_slice(b"\r\n");
    s.write_all(&cmd).expect("write to redis");
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    let read_line = |r: &mut BufReader<std::net::TcpStream>, line: &mut Vec<u8>| {
        line.clear();
        r.read_until(b'\n', line).expect("read from redis");
        assert!(line.ends_with(b"\r\n"), "redis reply line {line:?}");
        line.truncate(line.len() - 2);
    };
    read_line(&mut r, &mut line);
    let n: usize = match line.first() {
        // RESP2 array or RESP3 map of `n` pairs.
        Some(b'*') => std::str::from_utf8(&line[1..]).unwrap().parse().unwrap(),
        Some(b'%') => {
            2 * std::str::from_utf8(&line[1..])
                .unwrap()
                .parse::<usize>()
                .unwrap()
        }
        _ => panic!(
            "unexpected redis reply {:?}",
            String::from_utf8_lossy(&line)
        ),
    };
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        read_line(&mut r, &mut line);
        assert_eq!(line.first(), Some(&b'$'), "bulk string expected");
        let len: usize = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
        let mut v = vec![0; len + 2];
        r.read_exact(&mut v).expect("read bulk string");
        v.truncate(len);
        items.push(v);
    }
    let mut pairs = Vec::with_capacity(n / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        pairs.push((k, v));
    }
    pairs
}

/// Sends signal `sig` (a name for kill(1): `STOP`, `CONT`, ...) to process `pid`.
pub fn signal_pid(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}: {st}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_flags_only_when_set() {
        assert!(region_args(&ClusterOpts::default()).is_empty());
        let o = ClusterOpts {
            regions: vec!["a".into(), "b".into()],
            global_brokers: Some("127.0.0.1:1".into()),
            home_table: Some(PathBuf::from("/x/t")),
            ..ClusterOpts::default()
        };
        assert_eq!(
            region_args(&o),
            [
                "--regions",
                "a,b",
                "--global-brokers",
                "127.0.0.1:1",
                "--home-table",
                "/x/t"
            ]
        );
    }

    #[test]
    fn rendezvous_spreads_and_picks_homes() {
        let regions: Vec<String> = vec!["tokyo".into(), "frankfurt".into(), "ohio".into()];
        assert_eq!(rendezvous(b"x", &[]), None);
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let u = format!("u{i}");
            let h = rendezvous(u.as_bytes(), &regions).unwrap();
            counts[regions.iter().position(|r| r == h).unwrap()] += 1;
            // The order of the list does not matter.
            let mut rev = regions.clone();
            rev.reverse();
            assert_eq!(rendezvous(u.as_bytes(), &rev), Some(h));
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        for r in &regions {
            for u in users_homed_in("p", r, &regions, 5) {
                assert_eq!(rendezvous(u.as_bytes(), &regions), Some(r.as_str()));
            }
        }
        let names = region_names(2);
        assert!(names.iter().all(|n| n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')));
        assert_ne!(names[0], names[1]);
    }

    #[test]
    fn fnv1a_vectors_match_the_bus() {
        assert_eq!(user_hash(b"alice"), 0x508b_2abb_65a0_3907);
        assert_eq!(user_hash(b"bob"), 0x004d_4419_134a_0a54);
        assert_eq!(partition_of(b"alice", 4), 3);
        assert_eq!(partition_of(b"bob", 4), 0);
    }
}
