//! Helpers shared by the integration tests: start a real `iris-edge`, run `iris-load`, read its
//! JSON report.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iris_perf::load::Report;

/// The `iris-edge` binary: `$IRIS_EDGE_BIN`, else `iris-edge` beside this test's target
/// directory (`target/debug/iris-edge`; `cargo build -p iris-edge` or `scripts/test.sh` builds
/// it).
pub fn edge_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IRIS_EDGE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/iris-edge
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("iris-edge");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p iris-edge` first (or set IRIS_EDGE_BIN)",
        bin.display()
    );
    bin
}

/// A running `iris-edge` on free loopback ports, stopped with SIGTERM on drop.
pub struct Edge {
    child: Child,
    pub client: SocketAddr,
    /// The protocol v2 listener, when started with [`Edge::start_v2`].
    pub v2: Option<SocketAddr>,
    pub pid: u32,
    /// The edge's ready line (`listening client=… v2=… v2tls=…`).
    pub ready: String,
    _dir: tempfile::TempDir,
}

impl Edge {
    /// Starts an edge with `shards` shards and waits for its "listening" line.
    pub fn start(shards: usize) -> Edge {
        Self::start_with(shards, &[])
    }

    /// Starts an edge with `shards` shards that also serves protocol v2 on a free port.
    pub fn start_v2(shards: usize) -> Edge {
        let e = Self::start_with(shards, &["--listen-v2", "127.0.0.1:0"]);
        assert!(e.v2.is_some(), "the edge printed no v2= address");
        e
    }

    /// Starts an edge with `shards` shards and `extra` flags.
    pub fn start_with(shards: usize, extra: &[&str]) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(edge_bin())
            .args(extra)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--shards",
            ])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start iris-edge");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read edge stdout");
        let client = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("client="))
            .unwrap_or_else(|| panic!("unexpected edge output {line:?}"))
            .parse()
            .expect("client address");
        let v2 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v2="))
            .map(|a| a.parse().expect("v2 address"));
        let pid = child.id();
        Edge {
            child,
            client,
            v2,
            pid,
            ready: line,
            _dir: dir,
        }
    }

    /// Starts a one-shard edge serving v2 over TCP, TLS, WebSocket and WebSocket over TLS,
    /// with a self-signed certificate for `localhost` written to `dir` (`dir/edge.crt` is the
    /// file to trust).
    pub fn start_v2_transports(dir: &Path) -> Edge {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("self-signed certificate");
        let (crt, key) = (dir.join("edge.crt"), dir.join("edge.key"));
        std::fs::write(&crt, cert.cert.pem()).unwrap();
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        let config = dir.join("edge.toml");
        std::fs::write(
            &config,
            format!(
                "[v2]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
                crt.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        let any = "127.0.0.1:0";
        let config = config.display().to_string();
        Self::start_with(
            1,
            &[
                "--config",
                &config,
                "--listen-v2",
                any,
                "--listen-v2-tls",
                any,
                "--listen-v2-ws",
                any,
                "--listen-v2-wss",
                any,
            ],
        )
    }

    /// The address after `key=` in the ready line (`v2tls`, `v2ws`, `v2wss`, …).
    pub fn addr(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready))
            .to_owned()
    }

    /// The summed (unlabelled) value of counter `name` on the edge's `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr("admin")).expect("admin");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SAFETY: kill() only sends a signal to our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `iris-load` with `args` (plus one unpinned worker, quiet, JSON to a temp file) and
/// returns its parsed report; panics if it fails.
pub fn run_load(args: &[&str]) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_iris-load"))
        .args(args)
        .args([
            "--quiet",
            "--no-pin",
            "--cpus",
            "0",
            "--io-memory",
            "131072",
        ])
        .arg("--json")
        .arg(&json)
        .stderr(Stdio::inherit())
        .output()
        .expect("run iris-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iris-load {args:?} failed:\n{stdout}");
    assert!(stdout.contains("== iris-load"), "no final table:\n{stdout}");
    let text = std::fs::read_to_string(&json).expect("report written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("report is JSON");
    assert!(v["command"].is_array() && v["host"]["cpu_model"].is_string());
    Report::read_json(&json).expect("report parses")
}

/// Checks a latency summary is internally consistent.
pub fn assert_sane_latency(r: &Report) {
    let l = r.latency.expect("latency recorded");
    assert!(l.count > 0, "no latency samples");
    assert!(l.min_us > 0.0, "{l:?}");
    assert!(
        l.min_us <= l.p50_us
            && l.p50_us <= l.p90_us
            && l.p90_us <= l.p99_us
            && l.p99_us <= l.p999_us
            && l.p999_us <= l.max_us,
        "{l:?}"
    );
    assert!(l.max_us < 60e6, "latency over a minute: {l:?}");
    assert!(!r.latency_distribution.is_empty());
}
