//! `iris-tests`: cross-process integration tests that start real `iris-edge` processes and talk
//! to them over real sockets, as an unchanged v1 client would.
//!
//! The harness:
//! - [`Server`]: starts `iris-edge` on port 0 (client and admin), with a temporary data directory
//!   unless one is given, reads its `iris-edge listening ...` line, and can SIGTERM it, `kill -9`
//!   it and restart it on the same data directory. Dropping it kills the process. Its standard
//!   error goes to a log file that is printed when a test panics.
//! - [`Client`]: a blocking `std::net` client with timeouts (10 s by default) that reads server
//!   frames with its own decoder ([`decode_server`]), written from `PROTOCOL.md` independently of
//!   the server's codec, so a wire mistake shared by the server's encoder and decoder still fails.
//! - [`wire`]: hand-written encoders of every client frame, and [`cbor`] a tiny CBOR map encoder.
//! - [`services`]: real tansu and `redis-server` processes on free loopback ports, for the
//!   `iris-bus` and `iris-core` tests.
//! - [`cluster`]: a whole local region per test (tansu, `redis-server`, `iris-core` members and
//!   `iris-edge` processes in `--bus kafka` mode), with kill -9 and restart of every part.
//! - [`tls`]: a test certificate authority for the TLS and WSS tests.
//! - [`v2`]: a protocol v2 client on a raw socket ([`ServerOpts::with_v2`] serves v2).
//!
//! Locating the binary: `IRIS_EDGE_BIN`, else `iris-edge` next to the test executable's
//! directory (`target/debug/deps/..` = `target/debug`). Build it first with
//! `cargo build -p iris-edge` (`scripts/test.sh` does). `iris-core` likewise ([`core_bin`]:
//! `IRIS_CORE_BIN`, else next to `iris-edge`).

pub mod cluster;
pub mod owed;
pub mod services;
pub mod tls;
pub mod v2;

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default time a [`Client`] waits for a frame.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Server::start`] waits for the `listening` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Length of a server-chosen message id (16 lowercase hex digits).
pub const ID_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// Binary and small utilities
// ---------------------------------------------------------------------------------------------

/// The `iris-edge` binary the tests start.
pub fn edge_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IRIS_EDGE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "IRIS_EDGE_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    // target/debug/deps/<test>-<hash> → target/debug/iris-edge
    if let Some(deps) = exe.parent() {
        candidates.push(deps.join("iris-edge"));
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("iris-edge"));
        }
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "iris-edge binary not found (looked at {candidates:?}; or set IRIS_EDGE_BIN): \
         run `cargo build -p iris-edge` first (scripts/test.sh does)"
    );
}

/// The `iris-core` binary the cluster tests start: `IRIS_CORE_BIN`, else `iris-core` in the
/// same places [`edge_bin`] looks (`target/debug`). Build it with `cargo build -p iris-core`.
pub fn core_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IRIS_CORE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "IRIS_CORE_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        candidates.push(deps.join("iris-core"));
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("iris-core"));
        }
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "iris-core binary not found (looked at {candidates:?}; or set IRIS_CORE_BIN): \
         run `cargo build -p iris-core` first (scripts/test.sh does)"
    );
}

/// The `iris-delay-proxy` binary (perf crate; `cargo build --workspace --bins`), or
/// `IRIS_DELAY_PROXY_BIN`.
pub fn delay_proxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IRIS_DELAY_PROXY_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "IRIS_DELAY_PROXY_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        candidates.push(deps.join("iris-delay-proxy"));
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("iris-delay-proxy"));
        }
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "iris-delay-proxy binary not found (looked at {candidates:?}; or set \
         IRIS_DELAY_PROXY_BIN): run `cargo build --workspace --bins` first"
    );
}

/// Unix time now, in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Unix time now, in seconds.
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A user name unique within this test process: `prefix-N`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A payload of `len` bytes (at least 10) whose first 10 bytes are `i` in decimal
/// (zero-padded), then `tag` bytes cycling, so order and contents can be checked.
pub fn numbered(i: usize, len: usize) -> Vec<u8> {
    assert!(len >= 10);
    let mut v = format!("{i:010}").into_bytes();
    let mut k = 0u8;
    while v.len() < len {
        v.push(b'a' + (i as u8).wrapping_add(k) % 26);
        k = k.wrapping_add(1);
    }
    v
}

/// The number a [`numbered`] payload starts with (panics on anything else).
pub fn number_of(payload: &[u8]) -> usize {
    let head = payload
        .get(..10)
        .unwrap_or_else(|| panic!("payload too short to be numbered: {:?}", Bytes(payload)));
    std::str::from_utf8(head)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("payload is not numbered: {:?}", Bytes(payload)))
}

/// The shard that minted message id `id` (16 hex digits): its low 6 bits (`edge/src/idgen.rs`).
pub fn shard_of_id(id: &[u8]) -> usize {
    (id_value(id) & 63) as usize
}

/// The time a message id carries, in µs since the id epoch (2024-01-01 UTC): its 16 µs tick
/// (the bits above the low 18) times 16.
pub fn id_micros(id: &[u8]) -> u64 {
    (id_value(id) >> 18) * 16
}

/// The number a 16-hex-digit message id stands for.
pub fn id_value(id: &[u8]) -> u64 {
    std::str::from_utf8(id)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("not a message id: {:?}", Bytes(id)))
}

/// Describes how `got` differs from `expected` (first difference, duplicates, missing), or
/// `None` when they are equal.
pub fn describe_sequence_diff(got: &[usize], expected: &[usize]) -> Option<String> {
    if got == expected {
        return None;
    }
    let first = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    let lo = first.saturating_sub(4);
    let window = &got[lo..(first + 8).min(got.len())];
    let mut seen = std::collections::HashSet::new();
    let dups = got.iter().filter(|n| !seen.insert(**n)).count();
    let missing = expected.iter().filter(|n| !seen.contains(n)).count();
    Some(format!(
        "{} received, {} expected; first difference at index {first} (expected {:?}), \
         received[{lo}..] = {window:?}; {dups} duplicates, {missing} missing",
        got.len(),
        expected.len(),
        expected.get(first)
    ))
}

/// Debug-prints bytes as an escaped byte string (truncated after 96 bytes).
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(96)];
        write!(f, "b\"{}\"", shown.escape_ascii())?;
        if self.0.len() > 96 {
            write!(f, "...({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------------

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// `--shards` (0 means 2).
    pub shards: usize,
    /// TOML text written to a file and passed with `--config`.
    pub config: Option<String>,
    /// Data directory; a fresh temporary one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
    /// Skip the readiness probe (see [`Server::start`]): return as soon as the line is printed.
    pub no_ready_probe: bool,
    /// Extra command-line arguments, appended after the harness's own (kept across restarts),
    /// e.g. `--bus kafka --brokers H:P ...` for a cluster edge.
    pub args: Vec<String>,
}

impl ServerOpts {
    /// Also serve protocol v2 on a free port (`--listen-v2 127.0.0.1:0`; [`Server::v2`]).
    pub fn with_v2(mut self) -> Self {
        self.args.push("--listen-v2".into());
        self.args.push("127.0.0.1:0".into());
        self
    }

    /// `shards` shards, everything else default.
    pub fn shards(n: usize) -> Self {
        ServerOpts {
            shards: n,
            ..Default::default()
        }
    }

    /// Adds a config file with this TOML text.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }
}

/// A running (or stopped) `iris-edge` process.
pub struct Server {
    child: Option<Child>,
    /// Client protocol address.
    pub client: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// Shards as announced.
    pub shards: usize,
    /// Protocol v2 address, when the server serves v2 (`--listen-v2`).
    pub v2: Option<SocketAddr>,
    /// Protocol v2 over TLS address (`--listen-v2-tls`).
    pub v2_tls: Option<SocketAddr>,
    /// Protocol v2 over WebSocket address (`--listen-v2-ws`).
    pub v2_ws: Option<SocketAddr>,
    /// Protocol v2 over WebSocket over TLS address (`--listen-v2-wss`).
    pub v2_wss: Option<SocketAddr>,
    opts: ServerOpts,
    data_dir: PathBuf,
    log_path: PathBuf,
    config_path: Option<PathBuf>,
    generation: u32,
    // Last: removed after the process is gone.
    root: tempfile::TempDir,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("client", &self.client)
            .field("admin", &self.admin)
            .field("shards", &self.shards)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl Server {
    /// Starts a server and waits (up to 20 s) until it prints its `listening` line. Then, unless
    /// `no_ready_probe`, it also waits (up to 20 s more) until every shard has accepted a probe
    /// connection (`iris_edge_connections_accepted_total{shard="i"}` > 0): the line is meant to
    /// come once the edge serves, but a shard that starts late would otherwise make every test
    /// fail for that one reason (`listening_line_means_every_shard_serves` checks the line alone).
    pub fn start(opts: ServerOpts) -> Server {
        let root = tempfile::Builder::new()
            .prefix("iris-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| root.path().join("data"));
        let config_path = opts.config.as_ref().map(|text| {
            let p = root.path().join("iris.toml");
            std::fs::write(&p, text).expect("write config");
            p
        });
        let log_path = root.path().join("iris-edge.stderr.log");
        let mut s = Server {
            child: None,
            client: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: 0,
            v2: None,
            v2_tls: None,
            v2_ws: None,
            v2_wss: None,
            opts,
            data_dir,
            log_path,
            config_path,
            generation: 0,
            root,
        };
        s.spawn();
        s
    }

    /// Starts a server with `shards` shards and default settings.
    pub fn with_shards(shards: usize) -> Server {
        Server::start(ServerOpts::shards(shards))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server is still running");
        self.generation += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        writeln!(log, "==== iris-edge start #{} ====", self.generation).expect("write log");
        let shards = if self.opts.shards == 0 {
            2
        } else {
            self.opts.shards
        };
        let mut cmd = Command::new(edge_bin());
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--shards")
            .arg(shards.to_string());
        if let Some(p) = &self.config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.args(&self.opts.args);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn iris-edge");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Reads (and keeps draining) standard output so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.starts_with("iris-edge listening ") => break line,
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "iris-edge exited before serving ({status}); stderr:\n{}",
                    self.log_tail(8000)
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "iris-edge did not print its listening line within {START_TIMEOUT:?}; stderr:\n{}",
                    self.log_tail(8000)
                );
            }
        };
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in listening line {line:?}"))
                .to_owned()
        };
        self.client = field("client=").parse().expect("client address");
        self.admin = field("admin=").parse().expect("admin address");
        self.shards = field("shards=").parse().expect("shard count");
        let optional = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|a| a.parse().expect("v2 address"))
        };
        self.v2 = optional("v2=");
        self.v2_tls = optional("v2tls=");
        self.v2_ws = optional("v2ws=");
        self.v2_wss = optional("v2wss=");
        assert_eq!(self.shards, shards, "listening line: {line:?}");
        self.child = Some(child);
        if !self.opts.no_ready_probe {
            self.wait_shards_accepting(Duration::from_secs(20));
        }
    }

    /// Opens probe connections (never logged in) until every shard has accepted one, or
    /// `timeout` passes; returns whether all did. The probes are closed before returning.
    pub fn wait_shards_accepting(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut probes = Vec::new();
        loop {
            let (code, text) = http_get(self.admin, "/metrics");
            let accepted: Vec<Option<u64>> = (0..self.shards)
                .map(|i| metric_value(&text, "iris_edge_connections_accepted_total", Some(i)))
                .collect();
            if code != 200 || accepted.iter().any(Option::is_none) {
                return false; // no such metric: nothing to wait for
            }
            if accepted.iter().all(|n| n.unwrap_or(0) > 0) {
                return true;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "iris-tests: not every shard accepted a connection within {timeout:?} of the \
                     listening line: accepted per shard {accepted:?}"
                );
                return false;
            }
            if probes.len() < 64 {
                if let Ok(p) = TcpStream::connect(self.client) {
                    probes.push(p);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id (panics if stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory for this server's files (logs, config).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Everything the server wrote to standard error, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` bytes of [`Server::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let mut start = log.len().saturating_sub(n);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_owned()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics (with the log) unless the process is still running.
    pub fn assert_running(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(Some(status)) = c.try_wait() {
                panic!(
                    "iris-edge died ({status}); stderr:\n{}",
                    self.log_tail(8000)
                );
            }
        } else {
            panic!("iris-edge is not running");
        }
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    /// Sends a signal to the process.
    pub fn signal(&mut self, sig: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own child, which we have not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits for the process to exit; panics (after killing it) if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server is not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "iris-edge did not exit within {timeout:?}; stderr:\n{}",
                    self.log_tail(8000)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets the running process's soft `RLIMIT_FSIZE` (`None`: as high as its hard limit): a
    /// write past it fails with `EFBIG` (the edge ignores `SIGXFSZ`), as on a full disk. Set
    /// after startup: the store preallocates its journal when it opens, and a write into that
    /// preallocated file past the limit still fails. A restart starts without it.
    pub fn set_fsize_limit(&mut self, limit: Option<u64>) {
        let pid = self.pid() as libc::pid_t;
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit with a valid pid and pointers to live stack values.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut rl) };
        assert_eq!(rc, 0, "prlimit get: {}", io::Error::last_os_error());
        rl.rlim_cur = limit.map_or(rl.rlim_max, |l| l.min(rl.rlim_max));
        // SAFETY: as above.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &rl, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit set: {}", io::Error::last_os_error());
    }

    /// The exit status if the process has exited (it is reaped and [`Server::restart`] may
    /// start it again); `None` while it runs or when it was not running.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("server is not running");
        child.kill().expect("kill -9");
        let _ = child.wait();
    }

    /// Starts the process again on the same data directory (new ports); it must be stopped.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// `VmRSS` of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid()).expect("VmRSS in /proc/PID/status")
    }

    /// Samples the process's `VmRSS` every 10 ms until `done` is set; the thread returns the
    /// peak, in KiB.
    pub fn rss_sampler(
        &self,
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<u64> {
        let pid = self.pid();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    }

    /// A new connection to the client port.
    pub fn connect(&self) -> Client {
        Client::connect(self.client)
    }

    /// A new connection (not logged in) that shard `shard` accepted: connects until the
    /// shard's `iris_edge_connections_accepted_total` counter is the one that moved. Needs no
    /// other connection to be accepted meanwhile.
    pub fn connect_to_shard(&self, shard: usize) -> Client {
        let accepted = |s: &Server| {
            let m = s.metrics();
            (0..s.shards)
                .map(|i| {
                    metric_value(&m, "iris_edge_connections_accepted_total", Some(i)).unwrap_or(0)
                })
                .collect::<Vec<u64>>()
        };
        for _ in 0..200 {
            let before = accepted(self);
            let c = self.connect();
            let mut after = accepted(self);
            let deadline = Instant::now() + Duration::from_secs(5);
            while after.iter().sum::<u64>() == before.iter().sum::<u64>() {
                assert!(
                    Instant::now() < deadline,
                    "connection not accepted within 5 s"
                );
                std::thread::sleep(Duration::from_millis(1));
                after = accepted(self);
            }
            let moved: Vec<usize> = (0..self.shards)
                .filter(|&i| after[i] != before[i])
                .collect();
            assert_eq!(moved.len(), 1, "another connection was accepted meanwhile");
            if moved[0] == shard {
                return c;
            }
        }
        panic!("200 connections, none on shard {shard}");
    }

    /// A new connection, logged in as `user` (LOGIN_OK checked).
    pub fn login(&self, user: &str) -> Client {
        let mut c = self.connect();
        c.login(user);
        c
    }

    /// `GET path` on the admin port: (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let (code, body) = self.admin_get("/metrics");
        assert_eq!(code, 200, "/metrics answered {code}: {body}");
        body
    }

    /// The unlabelled (summed) value of metric `name` (full name, e.g. `iris_edge_logins_total`).
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics();
        metric_value(&text, name, None)
            .unwrap_or_else(|| panic!("metric {name} not found in /metrics:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let n = failure_log_bytes();
            eprintln!(
                "---- iris-edge stderr ({}), last {n} bytes ----\n{}",
                self.log_path.display(),
                self.log_tail(n)
            );
        }
    }
}

/// How much of a process's log a failing test prints: `IRIS_TEST_LOG_TAIL_BYTES`, 6000 by
/// default (raise it with `RUST_LOG=debug` to see a flaky failure's whole story).
pub fn failure_log_bytes() -> usize {
    std::env::var("IRIS_TEST_LOG_TAIL_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000)
}

/// The value of `name` (with `{shard="i"}` when `shard` is given) in Prometheus text.
pub fn metric_value(text: &str, name: &str, shard: Option<usize>) -> Option<u64> {
    let key = match shard {
        Some(i) => format!("{name}{{shard=\"{i}\"}}"),
        None => name.to_owned(),
    };
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        if k == key {
            v.trim().parse::<f64>().ok().map(|f| f as u64)
        } else {
            None
        }
    })
}

/// A minimal blocking HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {text:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, body.to_owned())
}

/// Runs `iris-edge --config FILE --check` on this TOML text.
pub fn run_check(toml: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("check.toml");
    std::fs::write(&p, toml).expect("write config");
    Command::new(edge_bin())
        .arg("--config")
        .arg(&p)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .expect("run iris-edge --check")
}

// ---------------------------------------------------------------------------------------------
// Server frames (our own decoder)
// ---------------------------------------------------------------------------------------------

/// A server → client frame, owned.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// `03 LOGIN_OK`.
    LoginOk,
    /// `0x10 | u16 idlen | id | u32 len | payload`.
    Reliable { id: Vec<u8>, payload: Vec<u8> },
    /// `0x06 | u16 ulen | user | u8 online | u64 last_seen`.
    Status {
        user: Vec<u8>,
        online: u8,
        last_seen: u64,
    },
    /// `0x72 | u16 slen | sender | u8 on`.
    Typing { sender: Vec<u8>, on: u8 },
    /// `0x75 | u16 ilen | id | u16 rlen | reader | u64 unix_ms`.
    Receipt {
        id: Vec<u8>,
        reader: Vec<u8>,
        unix_ms: u64,
    },
    /// `0xFE | u16 len | reason`.
    Error(String),
    /// `0xFF | u32 retry_after_ms`.
    RateLimited(u32),
    /// `0x22 | u32 len | cbor`.
    Prekeys(Vec<u8>),
    /// Raw `AUTH_FAILED`.
    AuthFailed,
    /// Raw `RATE_LIMITED`.
    RateLimitedText,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::LoginOk => write!(f, "LoginOk"),
            Frame::Reliable { id, payload } => {
                write!(
                    f,
                    "Reliable {{ id: {:?}, payload: {:?} }}",
                    Bytes(id),
                    Bytes(payload)
                )
            }
            Frame::Status {
                user,
                online,
                last_seen,
            } => write!(
                f,
                "Status {{ user: {:?}, online: {online}, last_seen: {last_seen} }}",
                Bytes(user)
            ),
            Frame::Typing { sender, on } => {
                write!(f, "Typing {{ sender: {:?}, on: {on} }}", Bytes(sender))
            }
            Frame::Receipt {
                id,
                reader,
                unix_ms,
            } => write!(
                f,
                "Receipt {{ id: {:?}, reader: {:?}, unix_ms: {unix_ms} }}",
                Bytes(id),
                Bytes(reader)
            ),
            Frame::Error(r) => write!(f, "Error({r:?})"),
            Frame::RateLimited(ms) => write!(f, "RateLimited({ms})"),
            Frame::Prekeys(c) => write!(f, "Prekeys({:?})", Bytes(c)),
            Frame::AuthFailed => write!(f, "AuthFailed"),
            Frame::RateLimitedText => write!(f, "RateLimitedText"),
        }
    }
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Decodes the server frame at the head of `buf`, written from `PROTOCOL.md` alone:
/// `Ok(None)` while incomplete, `Err` with a description for bytes no server may send.
pub fn decode_server(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    struct Rd<'a> {
        b: &'a [u8],
        p: usize,
    }
    impl<'a> Rd<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let s = self.b.get(self.p..self.p.checked_add(n)?)?;
            self.p += n;
            Some(s)
        }
        fn b16(&mut self) -> Option<&'a [u8]> {
            let n = be16(self.take(2)?);
            self.take(n)
        }
        fn b32(&mut self) -> Option<&'a [u8]> {
            let n = be32(self.take(4)?);
            self.take(n)
        }
    }
    let Some(&op) = buf.first() else {
        return Ok(None);
    };
    let text_prefix = |text: &[u8]| -> Result<Option<usize>, String> {
        let n = buf.len().min(text.len());
        if buf[..n] != text[..n] {
            return Err(format!(
                "bad server bytes: expected {:?}, got {:?}",
                Bytes(text),
                Bytes(buf)
            ));
        }
        Ok((buf.len() >= text.len()).then_some(text.len()))
    };
    let mut r = Rd { b: buf, p: 1 };
    let frame = match op {
        0x03 => {
            return Ok(text_prefix(b"\x03LOGIN_OK")?.map(|n| (Frame::LoginOk, n)));
        }
        b'A' => return Ok(text_prefix(b"AUTH_FAILED")?.map(|n| (Frame::AuthFailed, n))),
        b'R' => {
            return Ok(text_prefix(b"RATE_LIMITED")?.map(|n| (Frame::RateLimitedText, n)));
        }
        0x10 => (|| {
            let id = r.b16()?.to_vec();
            let payload = r.b32()?.to_vec();
            Some(Frame::Reliable { id, payload })
        })(),
        0x06 => (|| {
            let user = r.b16()?.to_vec();
            let online = r.take(1)?[0];
            let last_seen = be64(r.take(8)?);
            Some(Frame::Status {
                user,
                online,
                last_seen,
            })
        })(),
        0x72 => (|| {
            let sender = r.b16()?.to_vec();
            let on = r.take(1)?[0];
            Some(Frame::Typing { sender, on })
        })(),
        0x75 => (|| {
            let id = r.b16()?.to_vec();
            let reader = r.b16()?.to_vec();
            let unix_ms = be64(r.take(8)?);
            Some(Frame::Receipt {
                id,
                reader,
                unix_ms,
            })
        })(),
        0xFE => (|| {
            let reason = r.b16()?;
            Some(Frame::Error(String::from_utf8_lossy(reason).into_owned()))
        })(),
        0xFF => (|| Some(Frame::RateLimited(be32(r.take(4)?) as u32)))(),
        0x22 => (|| Some(Frame::Prekeys(r.b32()?.to_vec())))(),
        other => {
            return Err(format!(
                "unknown server opcode 0x{other:02x} at the head of {:?}",
                Bytes(buf)
            ))
        }
    };
    Ok(frame.map(|f| (f, r.p)))
}

// ---------------------------------------------------------------------------------------------
// Client frames (hand-written encoders)
// ---------------------------------------------------------------------------------------------

/// Hand-written encoders of the client frames of `PROTOCOL.md` (independent of the server's).
pub mod wire {
    fn p16(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u16::try_from(b.len()).expect("u16 field").to_be_bytes());
        out.extend_from_slice(b);
    }

    fn p32(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).expect("u32 field").to_be_bytes());
        out.extend_from_slice(b);
    }

    /// `0x01 | body`.
    pub fn login(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0x01];
        v.extend_from_slice(body);
        v
    }

    /// `0x02 | u16 tlen | target | u16 mlen | msg`.
    pub fn send(target: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0x02];
        p16(&mut v, target);
        p16(&mut v, msg);
        v
    }

    /// `0x03 | id`.
    pub fn ack(id: &[u8]) -> Vec<u8> {
        let mut v = vec![0x03];
        v.extend_from_slice(id);
        v
    }

    /// `0x04 | u16 tlen | target | u32 blen | (u16 len | msg)*`.
    pub fn batch_send(target: &[u8], entries: &[&[u8]]) -> Vec<u8> {
        let mut blob = Vec::new();
        for e in entries {
            p16(&mut blob, e);
        }
        batch_send_blob(target, &blob)
    }

    /// `0x04 | u16 tlen | target | u32 blen | blob` with a raw blob.
    pub fn batch_send_blob(target: &[u8], blob: &[u8]) -> Vec<u8> {
        let mut v = vec![0x04];
        p16(&mut v, target);
        p32(&mut v, blob);
        v
    }

    /// `0x05 | u16 tlen | target`.
    pub fn get_status(target: &[u8]) -> Vec<u8> {
        let mut v = vec![0x05];
        p16(&mut v, target);
        v
    }

    /// `0x07 | u16 tlen | target | u64 seq | u16 mlen | msg`.
    pub fn send_seq(target: &[u8], seq: u64, msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0x07];
        p16(&mut v, target);
        v.extend_from_slice(&seq.to_be_bytes());
        p16(&mut v, msg);
        v
    }

    /// `0x10 | u16 tlen | target | u32 clen | cbor`.
    pub fn cbor_msg(target: &[u8], cbor: &[u8]) -> Vec<u8> {
        let mut v = vec![0x10];
        p16(&mut v, target);
        p32(&mut v, cbor);
        v
    }

    /// `0x20 | u32 len | cbor`.
    pub fn upload_prekeys(bundle: &[u8]) -> Vec<u8> {
        let mut v = vec![0x20];
        p32(&mut v, bundle);
        v
    }

    /// `0x21 | u16 len | user`.
    pub fn fetch_prekeys(user: &[u8]) -> Vec<u8> {
        let mut v = vec![0x21];
        p16(&mut v, user);
        v
    }

    /// `0x23 | u16 rlen | recipient | u16 hlen | header | u32 clen | ciphertext`.
    pub fn e2ee_msg(recipient: &[u8], header: &[u8], ciphertext: &[u8]) -> Vec<u8> {
        let mut v = vec![0x23];
        p16(&mut v, recipient);
        p16(&mut v, header);
        p32(&mut v, ciphertext);
        v
    }

    /// `op | body` for a group frame (body hand-built by the caller).
    pub fn raw(op: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![op];
        v.extend_from_slice(body);
        v
    }

    /// `u16 len | bytes` (to build bodies by hand).
    pub fn l16(b: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        p16(&mut v, b);
        v
    }

    /// `u32 len | bytes`.
    pub fn l32(b: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        p32(&mut v, b);
        v
    }

    /// `0x70 / 0x71 | u16 tlen | target`.
    pub fn typing(target: &[u8], on: bool) -> Vec<u8> {
        let mut v = vec![if on { 0x70 } else { 0x71 }];
        p16(&mut v, target);
        v
    }

    /// `0x74 | u16 ilen | id | u16 slen | sender`.
    pub fn read_receipt(id: &[u8], sender: &[u8]) -> Vec<u8> {
        let mut v = vec![0x74];
        p16(&mut v, id);
        p16(&mut v, sender);
        v
    }

    /// The E2EE delivery as PROTOCOL.md describes it: `0x24 | u16 slen | sender | u16 hlen |
    /// header | u32 clen | ciphertext` (the payload of the recipient's 0x10).
    pub fn e2ee_delivery(sender: &[u8], header: &[u8], ciphertext: &[u8]) -> Vec<u8> {
        let mut v = vec![0x24];
        p16(&mut v, sender);
        p16(&mut v, header);
        p32(&mut v, ciphertext);
        v
    }
}

/// A tiny CBOR encoder for test maps (definite lengths, text keys).
pub mod cbor {
    /// A CBOR value for [`map`].
    #[derive(Debug, Clone)]
    pub enum V<'a> {
        Text(&'a str),
        Bytes(&'a [u8]),
        Uint(u64),
    }

    /// Appends a CBOR head: major type and argument.
    pub fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            out.push(m | n as u8);
        } else if n < 0x100 {
            out.push(m | 24);
            out.push(n as u8);
        } else if n < 0x1_0000 {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else if n < 0x1_0000_0000 {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }

    /// A map with text keys.
    pub fn map(entries: &[(&str, V<'_>)]) -> Vec<u8> {
        let mut out = Vec::new();
        head(&mut out, 5, entries.len() as u64);
        for (k, v) in entries {
            head(&mut out, 3, k.len() as u64);
            out.extend_from_slice(k.as_bytes());
            match v {
                V::Text(t) => {
                    head(&mut out, 3, t.len() as u64);
                    out.extend_from_slice(t.as_bytes());
                }
                V::Bytes(b) => {
                    head(&mut out, 2, b.len() as u64);
                    out.extend_from_slice(b);
                }
                V::Uint(n) => head(&mut out, 0, *n),
            }
        }
        out
    }

    /// `{"status": "not_found"}`, canonically encoded.
    pub const NOT_FOUND: &[u8] = b"\xa1\x66status\x69not_found";
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Why a read stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The server closed (EOF) or reset the connection.
    Closed(String),
}

/// A blocking v1 client.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    pending_acks: Vec<u8>,
    /// How long `recv*` waits for one frame.
    pub timeout: Duration,
    /// The user this connection logged in as last (set by [`Client::login`]).
    pub user: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.user)
            .field("local", &self.stream.local_addr().ok())
            .finish()
    }
}

impl Client {
    /// Connects (TCP_NODELAY on).
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: Vec::new(),
            pending_acks: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            user: None,
        }
    }

    /// Connects with `SO_RCVBUF` set to `bytes` before the handshake, so the kernel buffers
    /// little for a client that does not read (IPv4 only).
    pub fn connect_small_rcvbuf(addr: SocketAddr, bytes: i32) -> Client {
        use std::os::fd::FromRawFd;
        let SocketAddr::V4(v4) = addr else {
            panic!("connect_small_rcvbuf: IPv4 only")
        };
        // SAFETY: plain socket calls on a descriptor we own; the sockaddr_in is fully
        // initialised and outlives the connect call; on success the descriptor is handed to
        // TcpStream, which closes it.
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = v4.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            let rc = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "connect {addr}: {}", io::Error::last_os_error());
            TcpStream::from_raw_fd(fd)
        };
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: Vec::new(),
            pending_acks: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            user: None,
        }
    }

    /// The socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends LOGIN `user` and asserts that the next frame is LOGIN_OK.
    pub fn login(&mut self, user: &str) {
        self.write(&wire::login(user.as_bytes()));
        let f = self.recv();
        assert_eq!(f, Frame::LoginOk, "LOGIN {user:?}: expected LOGIN_OK");
        self.user = Some(user.to_owned());
    }

    /// Writes all bytes (panics on error).
    pub fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
        self.stream.flush().expect("flush");
    }

    /// Writes all bytes, returning the error (for peers that may close first).
    pub fn try_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes `bytes` in two writes split after `k` bytes, sleeping `pause` in between.
    pub fn write_split(&mut self, bytes: &[u8], k: usize, pause: Duration) {
        self.write(&bytes[..k]);
        std::thread::sleep(pause);
        self.write(&bytes[k..]);
    }

    /// SEND `msg` to `target`.
    pub fn send(&mut self, target: &str, msg: &[u8]) {
        self.write(&wire::send(target.as_bytes(), msg));
    }

    /// Sends many SENDs to `target`, packed into writes of about 64 KiB.
    pub fn send_many<I, P>(&mut self, target: &str, msgs: I)
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut out = Vec::with_capacity(70_000);
        for m in msgs {
            out.extend_from_slice(&wire::send(target.as_bytes(), m.as_ref()));
            if out.len() >= 64 << 10 {
                self.write(&out);
                out.clear();
            }
        }
        if !out.is_empty() {
            self.write(&out);
        }
    }

    /// ACK `id` now.
    pub fn ack(&mut self, id: &[u8]) {
        self.write(&wire::ack(id));
    }

    /// Queues an ACK, written before the next blocking read (or by [`Client::flush_acks`]).
    pub fn ack_later(&mut self, id: &[u8]) {
        self.pending_acks.extend_from_slice(&wire::ack(id));
    }

    /// Writes the queued ACKs.
    pub fn flush_acks(&mut self) {
        if !self.pending_acks.is_empty() {
            let acks = std::mem::take(&mut self.pending_acks);
            self.write(&acks);
        }
    }

    /// Reads more bytes into the buffer, waiting until `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), ReadEnd> {
        self.flush_acks();
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadEnd::Timeout);
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set timeout");
        let mut chunk = [0u8; 64 << 10];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ReadEnd::Closed("EOF".into())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ReadEnd::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(ReadEnd::Closed(e.to_string())),
        }
    }

    /// The next frame and its raw bytes, or why none came before `deadline`.
    pub fn next_raw(&mut self, deadline: Instant) -> Result<(Frame, Vec<u8>), ReadEnd> {
        loop {
            match decode_server(&self.buf) {
                Ok(Some((f, n))) => {
                    let raw: Vec<u8> = self.buf.drain(..n).collect();
                    return Ok((f, raw));
                }
                Ok(None) => {}
                Err(e) => panic!("{e}"),
            }
            self.fill(deadline)?;
        }
    }

    /// The next frame within `d`: `None` on timeout; panics if the connection closes.
    pub fn recv_within(&mut self, d: Duration) -> Option<Frame> {
        match self.next_raw(Instant::now() + d) {
            Ok((f, _)) => Some(f),
            Err(ReadEnd::Timeout) => None,
            Err(ReadEnd::Closed(why)) => panic!(
                "{:?}: connection closed ({why}) while waiting for a frame; unparsed bytes {:?}",
                self.user,
                Bytes(&self.buf)
            ),
        }
    }

    /// The next frame and its exact bytes (panics on timeout or close).
    pub fn recv_raw(&mut self) -> (Frame, Vec<u8>) {
        let t = self.timeout;
        match self.next_raw(Instant::now() + t) {
            Ok(fr) => fr,
            Err(ReadEnd::Timeout) => panic!(
                "{:?}: no frame within {t:?}; unparsed bytes {:?}",
                self.user,
                Bytes(&self.buf)
            ),
            Err(ReadEnd::Closed(why)) => panic!(
                "{:?}: connection closed ({why}) while waiting for a frame; unparsed bytes {:?}",
                self.user,
                Bytes(&self.buf)
            ),
        }
    }

    /// The next frame (panics on timeout or close).
    pub fn recv(&mut self) -> Frame {
        self.recv_raw().0
    }

    /// The next frame, which must be a RELIABLE_MSG with a 16-hex-digit id: (id, payload).
    pub fn recv_msg(&mut self) -> (Vec<u8>, Vec<u8>) {
        match self.recv() {
            Frame::Reliable { id, payload } => {
                assert_valid_id(&id);
                (id, payload)
            }
            other => panic!("{:?}: expected a RELIABLE_MSG, got {other:?}", self.user),
        }
    }

    /// The next RELIABLE_MSG's payload, acked (the ack is written before the next read).
    pub fn recv_acked(&mut self) -> Vec<u8> {
        let (id, payload) = self.recv_msg();
        self.ack_later(&id);
        payload
    }

    /// `n` RELIABLE_MSGs, each acked if `ack`: (id, payload) in arrival order.
    pub fn recv_msgs(&mut self, n: usize, ack: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let f = self.recv_within(self.timeout);
            match f {
                Some(Frame::Reliable { id, payload }) => {
                    assert_valid_id(&id);
                    if ack {
                        self.ack_later(&id);
                    }
                    out.push((id, payload));
                }
                Some(other) => panic!(
                    "{:?}: expected message {i} of {n}, got {other:?}",
                    self.user
                ),
                None => panic!(
                    "{:?}: only {i} of {n} messages arrived within {:?} of each other",
                    self.user, self.timeout
                ),
            }
        }
        self.flush_acks();
        out
    }

    /// Asserts that no frame arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        if let Some(f) = self.recv_within(d) {
            panic!("{:?}: expected nothing within {d:?}, got {f:?}", self.user);
        }
    }

    /// Reads until the server closes the connection (within the timeout); returns the frames
    /// that came before the close.
    pub fn expect_closed(&mut self) -> Vec<Frame> {
        let deadline = Instant::now() + self.timeout;
        let mut frames = Vec::new();
        loop {
            match self.next_raw(deadline) {
                Ok((f, _)) => frames.push(f),
                Err(ReadEnd::Closed(_)) => {
                    assert!(
                        self.buf.is_empty(),
                        "connection closed in the middle of a frame: {:?}",
                        Bytes(&self.buf)
                    );
                    return frames;
                }
                Err(ReadEnd::Timeout) => panic!(
                    "{:?}: connection not closed within {:?} (frames so far: {frames:?})",
                    self.user, self.timeout
                ),
            }
        }
    }

    /// Asserts the next bytes are exactly `0xFE | u16 len | reason`, and then the close.
    pub fn expect_error_and_close(&mut self, reason: &str) {
        let (f, raw) = match self.next_raw(Instant::now() + self.timeout) {
            Ok(fr) => fr,
            Err(e) => panic!(
                "expected 0xFE {reason:?} then close, got {e:?} (unparsed {:?})",
                Bytes(&self.buf)
            ),
        };
        let mut want = vec![0xFE];
        want.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        want.extend_from_slice(reason.as_bytes());
        assert_eq!(
            raw,
            want,
            "expected error {reason:?} ({:?}), got {f:?} ({:?})",
            Bytes(&want),
            Bytes(&raw)
        );
        let rest = self.expect_closed();
        assert!(
            rest.is_empty(),
            "frames after the error {reason:?}: {rest:?}"
        );
    }

    /// GET_STATUS `user`; the next frame must be its STATUS: (online, last_seen).
    pub fn status(&mut self, user: &str) -> (u8, u64) {
        self.write(&wire::get_status(user.as_bytes()));
        self.recv_status(user)
    }

    /// The next frame, which must be the STATUS of `user`: (online, last_seen).
    pub fn recv_status(&mut self, user: &str) -> (u8, u64) {
        match self.recv() {
            Frame::Status {
                user: u,
                online,
                last_seen,
            } if u == user.as_bytes() => (online, last_seen),
            other => panic!("expected STATUS of {user:?}, got {other:?}"),
        }
    }

    /// Polls GET_STATUS until `user` is online (presence is eventually consistent), max 2 s.
    /// Best-effort relays (typing, read receipts) reach only users presence knows as online.
    pub fn wait_online(&mut self, user: &str) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let st = self.status(user);
            if st.0 == 1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user:?} not online within 2 s: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A round trip (GET_STATUS of a made-up user): every frame written before it has been
    /// read and handled by the server's connection.
    pub fn sync(&mut self) {
        let _ = self.status("sync-probe");
    }

    /// The shard this logged-in connection is on: it sends its own user a message with a
    /// unique payload and reads the shard that minted its id ([`shard_of_id`]); the probe is
    /// acked (and anything else that arrives first, such as an earlier probe redelivered).
    pub fn which_shard(&mut self) -> usize {
        let me = self.user.clone().expect("which_shard: log in first");
        let probe = unique("which-shard-probe");
        self.send(&me, probe.as_bytes());
        loop {
            let (id, payload) = self.recv_msg();
            self.ack(&id);
            if payload == probe.as_bytes() {
                self.sync();
                return shard_of_id(&id);
            }
        }
    }

    /// Closes both directions at once (an abrupt client close).
    pub fn shutdown(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Bytes received but not parsed into a frame yet.
    pub fn unparsed(&self) -> &[u8] {
        &self.buf
    }
}

/// Panics unless `id` is 16 lowercase hex digits.
pub fn assert_valid_id(id: &[u8]) {
    assert!(
        id.len() == ID_LEN && id.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "message id is not 16 lowercase hex digits: {:?}",
        Bytes(id)
    );
}

/// Writes `bytes` from another thread (so a test can read while a big frame is written, and
/// the server may close early without a deadlock); returns the thread.
pub fn write_in_background(stream: &TcpStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut s = stream.try_clone().expect("clone stream");
    std::thread::spawn(move || {
        let _ = s.write_all(&bytes);
        let _ = s.flush();
    })
}

/// A pair of logged-in users that exchange one message each way: a bystander whose
/// connection must keep working whatever other clients do.
pub struct Bystander {
    pub a: Client,
    pub b: Client,
    n: usize,
}

impl Bystander {
    /// Logs in two fresh users.
    pub fn new(server: &Server) -> Bystander {
        let a = server.login(&unique("bystander-a"));
        let b = server.login(&unique("bystander-b"));
        Bystander { a, b, n: 0 }
    }

    /// Sends one message each way and checks it arrives (acked).
    pub fn check(&mut self, context: &str) {
        self.n += 1;
        let ua = self.a.user.clone().unwrap();
        let ub = self.b.user.clone().unwrap();
        let m1 = format!("ping {} {context}", self.n);
        let m2 = format!("pong {} {context}", self.n);
        self.a.send(&ub, m1.as_bytes());
        let got = self.b.recv_acked();
        assert_eq!(got, m1.as_bytes(), "bystander b after {context}");
        self.b.send(&ua, m2.as_bytes());
        let got = self.a.recv_acked();
        assert_eq!(got, m2.as_bytes(), "bystander a after {context}");
        self.a.flush_acks();
        self.b.flush_acks();
    }
}

/// `VmRSS` of process `pid`, in KiB (`None` once it is gone).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
