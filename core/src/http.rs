//! The one tiny HTTP responder behind every admin endpoint (`iris-edge` and `iris-core`).
//!
//! Admin endpoints run on their own plain OS thread and answer one request per connection:
//! `GET /metrics` (Prometheus text, rendered only when asked), `GET /health` (`200 ok`, or
//! `503` with the given word while the process stops), `404` for any other path and `405` for
//! any other method. No HTTP library: the requests are one line from a scraper or a probe.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Answers the one request on `s`. `stopping` is `Some(word)` once the process is shutting
/// down: `/health` then answers `503 word`.
pub fn answer_admin(
    mut s: TcpStream,
    metrics: impl FnOnce() -> String,
    stopping: Option<&str>,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
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
    let mut words = req.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics()),
        ("GET", "/health") => match stopping {
            Some(word) => ("503 Service Unavailable", "text/plain", format!("{word}\n")),
            None => ("200 OK", "text/plain", "ok\n".to_owned()),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}
