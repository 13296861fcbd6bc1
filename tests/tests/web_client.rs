//! The static web client (`examples/web`: `index.html` + `iris.js`) in a real headless
//! Chromium, against a real `iris-edge` serving protocol v2 over secure WebSocket
//! (`--listen-v2-wss`, a self-signed certificate made here with rcgen).
//!
//! The page is opened from `file://` with its automation hook (`?autotest=1&server=wss://...
//! &user=U&peer=P&send=TEXT&expect=TEXT2`): it logs in, sends TEXT, waits for the sent tick
//! (SEND_ACK), the peer's delivered receipt and a DELIVER of TEXT2, sends its receipts, and
//! logs its result as `IRIS-RESULT <URI-encoded JSON>` on the console, which Chromium prints
//! on standard error with `--enable-logging=stderr` (the browser runs in real time, so the
//! page's WebSocket does real network I/O; the test stops the browser once the line is seen).
//!
//! Chromium: `IRIS_CHROMIUM`, else `chromium` / `chromium-browser` on `PATH`, else (as root,
//! without `IRIS_NO_APT`) `apt-get install -y chromium`; when there is still none, each test
//! prints `SKIPPED: no chromium (...)` and returns.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use iris_tests::v2::V2;
use iris_tests::{Server, ServerOpts};
use iris_wire::v2::{ClientFrame, MsgKind, ReceiptKind, ServerFrame};

/// How long a page may take to produce its result (Chromium's start included).
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The page's own deadline (`timeout_ms`), below [`PAGE_TIMEOUT`] so its error is seen.
const PAGE_TIMEOUT_MS: &str = "50000";
/// How long `apt-get install chromium` may take.
const APT_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Finding (or installing) Chromium
// ---------------------------------------------------------------------------------------------

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"]
        .iter()
        .find_map(|n| on_path(n))
}

/// Runs `cmd` with a deadline; returns whether it exited 0 (its output is discarded).
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{cmd:?} failed: {s}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    }
}

fn apt_install_chromium() -> Result<(), String> {
    if std::env::var_os("IRIS_NO_APT").is_some() {
        return Err("IRIS_NO_APT is set".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root, cannot apt-get install chromium".into());
    }
    if on_path("apt-get").is_none() {
        return Err("no apt-get".into());
    }
    eprintln!("web_client: installing chromium with apt-get (once)");
    let install = || {
        run_with_timeout(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "chromium",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            APT_TIMEOUT,
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    // A fresh machine may have no package lists yet.
    run_with_timeout(Command::new("apt-get").args(["update", "-qq"]), APT_TIMEOUT)?;
    install()
}

/// Chromium's path, installing it once per test process if needed and possible.
fn chromium() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("IRIS_CHROMIUM") {
                let p = PathBuf::from(p);
                return match p.is_file() {
                    true => Ok(p),
                    false => Err(format!("IRIS_CHROMIUM={} is not a file", p.display())),
                };
            }
            if let Some(p) = find_chromium() {
                return Ok(p);
            }
            apt_install_chromium()?;
            find_chromium().ok_or_else(|| "apt-get installed no chromium binary".into())
        })
        .clone()
}

/// One test's hold on the browser: the tests of this file run one at a time, so that at most
/// two Chromium instances share the machine's cores.
type BrowserTurn = std::sync::MutexGuard<'static, ()>;

/// Chromium and this test's turn, or `None` after printing the SKIPPED line.
fn chromium_or_skip(test: &str) -> Option<(PathBuf, BrowserTurn)> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    match chromium() {
        Ok(p) => Some((p, TURN.lock().unwrap_or_else(|e| e.into_inner()))),
        Err(why) => {
            println!("SKIPPED: no chromium ({why}): {test}");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The page in a headless browser
// ---------------------------------------------------------------------------------------------

/// `application/x-www-form-urlencoded`-safe escaping of a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of JavaScript's `encodeURIComponent`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).expect("the page's result is UTF-8")
}

/// The `file://` URL of `examples/web/<page>` followed by `rest` (query or fragment).
fn file_url(page: &str, rest: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/web")
        .join(page)
        .canonicalize()
        .unwrap_or_else(|e| panic!("examples/web/{page}: {e}"));
    format!("file://{}{rest}", path.display())
}

/// The web client's URL with these query parameters.
fn page_url(params: &[(&str, &str)]) -> String {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", query_escape(v)))
        .collect();
    file_url("index.html", &format!("?{}", query.join("&")))
}

/// The bytes of every `<!-- example: NAME -->` block of docs/PROTOCOL-v2.md, as hex: each line
/// of the `text` block that follows, up to the first double space, is hex bytes.
fn doc_examples() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL-v2.md"),
    )
    .expect("docs/PROTOCOL-v2.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let mut hex = String::new();
        for l in lines.by_ref().skip(1) {
            if l.trim() == "```" {
                break;
            }
            hex.extend(l.split("  ").next().unwrap_or("").split_whitespace());
        }
        out.push((name.to_owned(), hex));
    }
    out
}

/// A headless Chromium showing one page; stopped (its whole process group) on drop.
struct Browser {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(chromium: &Path, url: &str) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("iris-web-chromium-")
            .tempdir()
            .expect("tempdir");
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--ignore-certificate-errors",
            "--allow-file-access-from-files",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so the renderer and helper processes are stopped with it.
        .process_group(0);
        let mut child = cmd.spawn().expect("spawn chromium");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let _ = tx.send(String::from_utf8_lossy(&buf).trim_end().to_owned());
                buf.clear();
            }
        });
        Browser {
            child,
            lines,
            seen: Vec::new(),
            _profile: profile,
        }
    }

    /// The page's `IRIS-RESULT` JSON, within [`PAGE_TIMEOUT`]; panics with the browser's
    /// console and errors if it does not come.
    fn result(&mut self) -> serde_json::Value {
        const MARK: &str = "IRIS-RESULT ";
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(MARK) {
                        let rest = &line[at + MARK.len()..];
                        let enc: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || "%-_.!~*'()".contains(*c))
                            .collect();
                        let json = percent_decode(&enc);
                        return serde_json::from_str(&json)
                            .unwrap_or_else(|e| panic!("bad result {json:?}: {e}"));
                    }
                    self.seen.push(line);
                }
                Err(_) => panic!(
                    "no result from the page within {PAGE_TIMEOUT:?}; chromium said:\n{}",
                    self.console()
                ),
            }
        }
    }

    /// The console and error lines Chromium printed so far (its D-Bus noise left out).
    fn console(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen
            .iter()
            .filter(|l| !l.contains("dbus"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group `pgid`, which is the
        // group this test made Chromium the leader of (`process_group(0)`), still not reaped.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; helpers that outlived the browser's SIGTERM are killed too.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A server serving v2 over plain TCP (the Rust peer) and WSS (the page), with a self-signed
/// certificate for 127.0.0.1 and localhost written next to it.
fn wss_server() -> (Server, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("iris-web-cert-")
        .tempdir()
        .expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".into()])
        .expect("self-signed certificate");
    let (cert, key) = (dir.path().join("edge.crt"), dir.path().join("edge.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let config = format!(
        "[v2]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let mut opts = ServerOpts::shards(2).with_v2().config(&config);
    opts.args.push("--listen-v2-wss".into());
    opts.args.push("127.0.0.1:0".into());
    let server = Server::start(opts);
    let wss = server.v2_wss.expect("the listening line has v2wss=");
    (server, wss, dir)
}

/// The peer's next frame within `d`, answering (and skipping) server PINGs: a slow browser
/// start can leave the peer silent for a ping interval.
fn next_frame(peer: &mut V2, d: Duration) -> Option<ServerFrame> {
    let deadline = Instant::now() + d;
    loop {
        match peer.recv_within(deadline.saturating_duration_since(Instant::now()))? {
            ServerFrame::Ping { nonce } => peer.write(&ClientFrame::Pong { nonce }),
            other => return Some(other),
        }
    }
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The page (alice, over WSS) and a Rust v2 client (bob, over TCP) exchange one message each,
/// with the sent tick, the delivered receipt both ways and the page's read receipt.
#[test]
fn the_page_and_a_rust_client_exchange_messages_with_ticks_and_receipts() {
    let Some((chromium, _turn)) = chromium_or_skip("web_client page <-> rust client") else {
        return;
    };
    let (server, wss, _certs) = wss_server();
    let (alice, bob_name) = (iris_tests::unique("alice"), iris_tests::unique("bob"));
    let (mut bob, _) = V2::hello(&server, &bob_name);
    let to_bob = "héllo bob ✓ from the browser";
    let to_alice = "hi alice 👋, from rust";
    let mut page = Browser::open(
        &chromium,
        &page_url(&[
            ("autotest", "1"),
            ("timeout_ms", PAGE_TIMEOUT_MS),
            ("server", &format!("wss://{wss}")),
            ("user", &alice),
            ("peer", &bob_name),
            ("send", to_bob),
            ("expect", to_alice),
        ]),
    );

    // bob gets the page's message, live, from alice; acks it and says it is delivered.
    let (id, sender, kind, payload) = match next_frame(&mut bob, PAGE_TIMEOUT) {
        Some(ServerFrame::Deliver {
            server_id,
            sender,
            kind,
            payload,
            ..
        }) => (server_id, sender, kind, payload),
        other => panic!(
            "expected the page's DELIVER, got {other:?}; chromium said:\n{}\nedge:\n{}",
            page.console(),
            server.log_tail(4000)
        ),
    };
    assert_eq!(sender, alice.as_bytes());
    assert_eq!(kind, MsgKind::Plain);
    assert_eq!(String::from_utf8(payload).unwrap(), to_bob);
    bob.write(&ClientFrame::Ack { ids: vec![id] });
    bob.write(&ClientFrame::Receipt {
        kind: ReceiptKind::Delivered,
        sender: alice.as_bytes().to_vec(),
        ids: vec![id],
    });
    bob.send(1, &alice, to_alice.as_bytes());
    let reply_id = match next_frame(&mut bob, Duration::from_secs(10)) {
        Some(ServerFrame::SendAck {
            client_msg_id: 1,
            server_id,
            ..
        }) => server_id,
        other => panic!("expected bob's SEND_ACK, got {other:?}"),
    };

    let r = page.result();
    assert_eq!(r["ok"], true, "page result {r}\n{}", page.console());
    assert_eq!(s(&r["sent_ack"]), id.to_string(), "the sent tick's id: {r}");
    assert_eq!(s(&r["got"]), to_alice, "{r}");
    assert_eq!(s(&r["from"]), bob_name, "{r}");
    assert_eq!(s(&r["got_id"]), reply_id.to_string(), "{r}");
    assert_eq!(s(&r["delivered"]["by"]), bob_name, "{r}");
    assert_eq!(r["delivered"]["kind"], 1, "{r}");

    // The page's receipts for the reply: delivered on DELIVER, then read once shown.
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match next_frame(&mut bob, Duration::from_secs(10)) {
            Some(ServerFrame::Receipt {
                kind, reader, ids, ..
            }) => {
                assert_eq!(
                    (reader.as_slice(), ids.as_slice()),
                    (alice.as_bytes(), &[reply_id][..])
                );
                kinds.push(kind);
            }
            other => panic!("expected the page's receipts, got {other:?}"),
        }
    }
    assert_eq!(kinds, [ReceiptKind::Delivered, ReceiptKind::Read]);

    // The page ACKed the reply: once the browser is gone, alice has nothing pending (the
    // server may handle the old connection's last frames after a new login: a few tries).
    drop(page);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut again, _) = V2::hello(&server, &alice);
        match next_frame(&mut again, Duration::from_millis(500)) {
            None => break,
            Some(f) if Instant::now() >= deadline => panic!("alice still has {f:?} pending"),
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Two pages, each in its own headless Chromium, talk to each other over WSS.
#[test]
fn two_pages_talk_to_each_other_over_wss() {
    let Some((chromium, _turn)) = chromium_or_skip("web_client two pages") else {
        return;
    };
    let (server, wss, _certs) = wss_server();
    let (alice, bob) = (iris_tests::unique("alice"), iris_tests::unique("bob"));
    let server_url = format!("wss://{wss}");
    let (a_text, b_text) = ("from alice's page", "from bob's page ✓✓");
    let open = |user: &str, peer: &str, send: &str, expect: &str| {
        Browser::open(
            &chromium,
            &page_url(&[
                ("autotest", "1"),
                ("timeout_ms", PAGE_TIMEOUT_MS),
                ("server", &server_url),
                ("user", user),
                ("peer", peer),
                ("send", send),
                ("expect", expect),
            ]),
        )
    };
    let mut a = open(&alice, &bob, a_text, b_text);
    let mut b = open(&bob, &alice, b_text, a_text);
    let (ra, rb) = (a.result(), b.result());
    assert_eq!(ra["ok"], true, "alice's page: {ra}\n{}", a.console());
    assert_eq!(rb["ok"], true, "bob's page: {rb}\n{}", b.console());
    assert_eq!((s(&ra["got"]), s(&ra["from"])), (b_text, bob.as_str()));
    assert_eq!((s(&rb["got"]), s(&rb["from"])), (a_text, alice.as_str()));
    // Each page's sent tick carries the id the other page got, and the other page's receipt.
    assert_eq!(s(&ra["sent_ack"]), s(&rb["got_id"]));
    assert_eq!(s(&rb["sent_ack"]), s(&ra["got_id"]));
    assert_eq!(s(&ra["delivered"]["by"]), bob);
    assert_eq!(s(&rb["delivered"]["by"]), alice);
    drop((a, b));
    drop(server);
}

/// iris.js encodes the client examples of docs/PROTOCOL-v2.md to the documented bytes, decodes
/// the server examples to the documented fields, and refuses malformed frames
/// (`examples/web/codec-check.html`, given the examples as read from the document).
#[test]
fn the_web_codec_matches_the_documented_bytes() {
    let Some((chromium, _turn)) = chromium_or_skip("web_client codec check") else {
        return;
    };
    let examples = doc_examples();
    assert!(examples.len() >= 20, "{examples:?}");
    let json = serde_json::Value::Object(
        examples
            .iter()
            .map(|(n, h)| (n.clone(), serde_json::Value::String(h.clone())))
            .collect(),
    );
    let url = file_url(
        "codec-check.html",
        &format!("#{}", query_escape(&json.to_string())),
    );
    let mut page = Browser::open(&chromium, &url);
    let r = page.result();
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_eq!(r["ok"], true, "{r}");
    // Every example but the two prekey frames the page does not send.
    let mut checked: Vec<&str> = r["checked"]
        .as_array()
        .expect("checked")
        .iter()
        .map(s)
        .collect();
    let mut expected: Vec<&str> = examples
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("c-prekey"))
        .collect();
    checked.sort_unstable();
    expected.sort_unstable();
    assert_eq!(checked, expected);
}
