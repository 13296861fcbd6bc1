//! Real service processes for integration tests: a tansu Kafka broker ([`Tansu`], memory or
//! sqlite storage) and a `redis-server` ([`RedisServer`], no persistence), each on its own free
//! loopback port ([`free_port`]), started with the flags the tests need, waited for until it
//! answers, and killed (SIGKILL) on drop ([`Proc`]).
//!
//! Locating the binaries: `tansu` on PATH or in `~/.cargo/bin` (`scripts/kafka.sh install`);
//! `redis-server` on PATH, installed once from the Debian package when missing
//! (`scripts/redis.sh install` does the same by hand).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long [`Tansu`] waits for its port to accept connections.
pub const TANSU_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`RedisServer`] waits for `PING` to be answered.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(5);

/// The `tansu` binary: on PATH, else `~/.cargo/bin/tansu`.
///
/// # Panics
/// With "tansu not found: run scripts/kafka.sh install" when there is none.
pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/tansu");
        if p.is_file() {
            return p;
        }
    }
    panic!("tansu not found: run scripts/kafka.sh install");
}

/// Makes sure `redis-server` is on PATH, installing it once (Debian package) when it is not.
///
/// # Panics
/// With "redis-server not found: run scripts/redis.sh install" when it is still missing.
pub fn ensure_redis_server() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if on_path("redis-server") {
            return;
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "redis-server"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !install() {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = install();
        }
    });
    assert!(
        on_path("redis-server"),
        "redis-server not found: run scripts/redis.sh install"
    );
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// A free loopback TCP port (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds.
///
/// # Panics
/// With "timed out waiting for {what}" after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    /// Kills the process (SIGKILL) and waits for it; nothing if it is already gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited, with its status (`None` while running or after
    /// [`Proc::kill9`]).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().unwrap())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tansu broker owned by one test, on its own loopback port; killed on drop. Its output goes
/// to `tansu.log` in its temporary directory.
pub struct Tansu {
    proc: Proc,
    port: u16,
    advertised: Option<u16>,
    storage: String,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// A broker with memory storage (lost when it stops).
    pub fn memory() -> Tansu {
        Tansu::start(None)
    }

    /// A broker whose data lives in a sqlite file in its temporary directory (kept across
    /// restarts).
    pub fn sqlite() -> Tansu {
        Tansu::start(Some("broker.db"))
    }

    /// A sqlite broker that advertises `127.0.0.1:advertised_port` instead of its own port:
    /// clients bootstrap anywhere but then talk to the advertised address, e.g. a
    /// [`DelayProxy`] listening there and forwarding to [`Tansu::port`].
    pub fn sqlite_advertising(advertised_port: u16) -> Tansu {
        Tansu::start_advertising(Some("broker.db"), Some(advertised_port))
    }

    fn start(sqlite_file: Option<&str>) -> Tansu {
        Tansu::start_advertising(sqlite_file, None)
    }

    fn start_advertising(sqlite_file: Option<&str>, advertised: Option<u16>) -> Tansu {
        let dir = tempfile::tempdir().unwrap();
        let storage = match sqlite_file {
            // tansu resolves the path against its working directory: start it in `/` and
            // give an absolute path.
            Some(f) => format!("sqlite://{}", dir.path().join(f).display()),
            None => "memory://tansu/".to_owned(),
        };
        let mut t = Tansu {
            proc: Proc(None),
            port: free_port(),
            advertised,
            storage,
            dir,
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu_bin())
            .current_dir("/")
            .env_remove("CLUSTER_ID")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env("RUST_LOG", "warn")
            .args(["broker", "--cluster-id", "iris-test"])
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", &self.storage])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("tansu could not be started: {e}"));
        self.proc = Proc(Some(child));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.proc.exited() {
                panic!("tansu exited at startup ({status}): {}", self.log());
            }
            assert!(
                start.elapsed() < TANSU_START_TIMEOUT,
                "tansu did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers` (the broker's own port; see
    /// [`Tansu::advertised_brokers`]).
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT` of the address the broker advertises (its own unless started with
    /// [`Tansu::sqlite_advertising`]): what clients should be given.
    pub fn advertised_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised.unwrap_or(self.port))
    }

    /// Everything the broker wrote so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.0.as_ref().map(Child::id)
    }

    /// Kills the broker (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// A `redis-server` owned by one test, on its own loopback port, without persistence (no RDB,
/// no AOF); killed on drop.
pub struct RedisServer {
    proc: Proc,
    port: u16,
}

impl RedisServer {
    /// Starts a server (see [`ensure_redis_server`]) and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        ensure_redis_server();
        let mut s = RedisServer {
            proc: Proc(None),
            port: free_port(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.proc = Proc(Some(child));
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server answers `PING` with `+PONG` (a raw RESP exchange).
    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// An `iris-delay-proxy` (perf crate) owned by one test: forwards a loopback port to an
/// upstream, holding every chunk `delay_ms` in each direction; killed on drop.
pub struct DelayProxy {
    proc: Proc,
    port: u16,
    upstream: String,
    delay_ms: u64,
}

impl DelayProxy {
    /// Starts a proxy on `127.0.0.1:port` (`0` = a free port) to `upstream` (`HOST:PORT`) and
    /// waits for its ready line.
    pub fn start(port: u16, upstream: &str, delay_ms: u64) -> DelayProxy {
        let mut p = DelayProxy {
            proc: Proc(None),
            port,
            upstream: upstream.to_owned(),
            delay_ms,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        use std::io::BufRead as _;
        let mut child = Command::new(crate::delay_proxy_bin())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--upstream", &self.upstream])
            .args(["--delay-ms", &self.delay_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn iris-delay-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("iris-delay-proxy printed no ready line within 10 s");
        let addr: std::net::SocketAddr = line
            .strip_prefix("iris-delay-proxy listening ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("iris-delay-proxy ready line {line:?}"));
        self.port = addr.port();
        self.proc = Proc(Some(child));
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The delay each way, milliseconds.
    pub fn delay_ms(&self) -> u64 {
        self.delay_ms
    }

    /// Kills the proxy (SIGKILL): every connection through it drops.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Kills the proxy and starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}
