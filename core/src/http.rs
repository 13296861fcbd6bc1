//! The one tiny HTTP responder behind every admin endpoint (`iris-edge` and `iris-core`).
//!
//! Admin endpoints run on their own plain OS thread and answer one request per connection:
//! `GET /metrics` (Prometheus text, rendered only when asked), `GET /health` (`200 ok`, or
//! `503` with the given word while the process stops), `404` for any other path and `405` for
//! any other method. No HTTP library: the requests are one line from a scraper or a probe.
//! [`answer_admin_with`] also hands `POST` requests to the caller (`iris-core`'s
//! `POST /rehome?user=U`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Answers the one request on `s`. `stopping` is `Some(word)` once the process is shutting
/// down: `/health` then answers `503 word`.
pub fn answer_admin(
    s: TcpStream,
    metrics: impl FnOnce() -> String,
    stopping: Option<&str>,
) -> std::io::Result<()> {
    answer_admin_with(s, metrics, stopping, |_| None)
}

/// An answer of a `POST` handler: status line (e.g. `"200 OK"`) and plain-text body.
pub type Answer = (&'static str, String);

/// [`answer_admin`], with `post` asked for every `POST` request (its argument is the request
/// target, path and query, e.g. `/rehome?user=alice`): `Some(answer)` is sent as is, `None`
/// answers `405`.
pub fn answer_admin_with(
    mut s: TcpStream,
    metrics: impl FnOnce() -> String,
    stopping: Option<&str>,
    post: impl FnOnce(&str) -> Option<Answer>,
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
        ("POST", target) => match post(target) {
            Some((status, body)) => (status, "text/plain", body),
            None => (
                "405 Method Not Allowed",
                "text/plain",
                "method not allowed\n".to_owned(),
            ),
        },
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

/// The value of query parameter `name` in request target `target` (`/path?a=1&b=2`),
/// percent-decoded (`+` is a space), as bytes; `None` when absent or badly encoded.
pub fn query_param(target: &str, name: &str) -> Option<Vec<u8>> {
    let query = target.split_once('?')?.1;
    let raw = query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_parameters_are_percent_decoded() {
        assert_eq!(
            query_param("/rehome?user=alice", "user"),
            Some(b"alice".to_vec())
        );
        assert_eq!(
            query_param("/rehome?x=1&user=a%20b%2Bc+d", "user"),
            Some(b"a b+c d".to_vec())
        );
        assert_eq!(query_param("/rehome?user=%zz", "user"), None);
        assert_eq!(query_param("/rehome?user=%4", "user"), None);
        assert_eq!(query_param("/rehome", "user"), None);
        assert_eq!(query_param("/rehome?other=1", "user"), None);
    }
}
