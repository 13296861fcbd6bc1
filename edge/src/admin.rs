//! The admin HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! It runs on its own small OS thread, away from the shards, and only reads the shards'
//! counters (relaxed atomic loads), so a scrape never slows the data path. `/health` answers
//! `200 ok` while serving and `503 draining` once shutdown has begun.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::metrics::{render, ShardMetrics};

/// Extra metric lines from outside the shards (the core), read at scrape time.
pub type ExtraMetrics =
    Arc<dyn Fn() -> Vec<(&'static str, &'static str, &'static str, u64)> + Send + Sync>;

/// Binds the admin listener (so the caller learns the real port) and serves it on a thread.
pub fn start(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    extra: ExtraMetrics,
    draining: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("iris-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve(s, &shards, &extra, &draining) {
                            debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(local)
}

fn serve(
    mut s: TcpStream,
    shards: &[Arc<ShardMetrics>],
    extra: &ExtraMetrics,
    draining: &AtomicBool,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        let r = s.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(shards, &extra()),
        ),
        "/health" if draining.load(Ordering::Relaxed) => (
            "503 Service Unavailable",
            "text/plain",
            "draining\n".to_owned(),
        ),
        "/health" => ("200 OK", "text/plain", "ok\n".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
