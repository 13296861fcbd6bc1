//! `iris-delay-proxy` over real sockets: an echo server behind the proxy; each round trip takes
//! at least twice the delay (once each way), the bytes come back intact and in order, a
//! half-close is passed on, and SIGTERM stops the proxy with status 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(upstream: SocketAddr, delay_ms: u64) -> Proxy {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iris-delay-proxy"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string()])
        .args(["--delay-ms", &delay_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn iris-delay-proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .strip_prefix("iris-delay-proxy listening ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("ready line {line:?}"))
        .parse()
        .expect("bound address");
    assert!(
        line.contains(&format!("upstream={upstream} delay_ms={delay_ms}")),
        "{line:?}"
    );
    Proxy { child, addr }
}

/// An echo server: writes back whatever it reads, closes its side when the client does.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn each_direction_is_delayed_and_bytes_arrive_intact_in_order() {
    const DELAY_MS: u64 = 150;
    let echo = echo_server();
    let proxy = start_proxy(echo, DELAY_MS);
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();

    // Small round trips: each crosses the proxy twice.
    for i in 0..3u8 {
        let msg = [b'p', b'i', b'n', b'g', i];
        let t0 = Instant::now();
        s.write_all(&msg).unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).unwrap();
        let rtt = t0.elapsed();
        assert_eq!(back, msg);
        assert!(
            rtt >= Duration::from_millis(2 * DELAY_MS),
            "round trip {rtt:?} < 2 x {DELAY_MS} ms"
        );
        println!("round trip {i}: {rtt:?}");
    }

    // 4 MiB written in many chunks from another thread while reading: every byte back, in
    // order, then the half-close comes through (read returns 0).
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in sent.chunks(7919) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len(), "bytes back");
    assert!(back == data, "the bytes came back changed or out of order");
}

#[test]
fn an_unreachable_upstream_closes_the_client_and_sigterm_stops_cleanly() {
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut proxy = start_proxy(dead, 10);
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the client connection is closed");

    let rc = send_signal(proxy.child.id(), "TERM");
    assert!(rc, "kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = proxy.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit within 5 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
}

fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
