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
            eprintln!(
                "---- iris-core member {}/{} stderr ({}), last 6000 bytes ----\n{}",
                self.member,
                self.members,
                self.log_path.display(),
                self.log_tail(6000)
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
        let region = format!("t{}-{}", std::process::id(), unique("r").replace("r-", ""));
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
    fn fnv1a_vectors_match_the_bus() {
        assert_eq!(user_hash(b"alice"), 0x508b_2abb_65a0_3907);
        assert_eq!(user_hash(b"bob"), 0x004d_4419_134a_0a54);
        assert_eq!(partition_of(b"alice", 4), 3);
        assert_eq!(partition_of(b"bob", 4), 0);
    }
}
