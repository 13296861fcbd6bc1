//! The admin HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! It runs on its own small OS thread, away from the shards, and only reads the shards'
//! counters (relaxed atomic loads), so a scrape never slows the data path. `/health` answers
//! `200 ok` while serving, `503 draining` once shutdown has begun, and `503 outbox_failed` when
//! the cluster edge's outbox cannot write (the edge accepts nothing more).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use iris_bus::hops::HopSnapshot;

use crate::metrics::{render, ShardMetrics};

/// Extra metric lines from outside the shards (the core), read at scrape time.
pub type ExtraMetrics =
    Arc<dyn Fn() -> Vec<(&'static str, &'static str, &'static str, u64)> + Send + Sync>;

/// Hop histograms from outside the shards (the cluster link), read at scrape time.
pub type ExtraHops = Arc<dyn Fn() -> Vec<(&'static str, HopSnapshot)> + Send + Sync>;

/// What the admin endpoint shows besides the shards' counters.
#[derive(Clone)]
pub struct Extras {
    /// Counter and gauge lines.
    pub lines: ExtraMetrics,
    /// Appends raw Prometheus text (gauges with fractional values) to the scrape.
    pub text: Arc<dyn Fn(&mut String) + Send + Sync>,
    /// Hops measured outside the shards, rendered in the `iris_edge_hop_seconds` family with
    /// the shards' hops (one family, one HELP/TYPE header).
    pub hops: ExtraHops,
    /// `Some(word)` while the edge cannot accept: `/health` answers `503 word`.
    pub unhealthy: Arc<dyn Fn() -> Option<&'static str> + Send + Sync>,
}

impl Extras {
    /// Only counter and gauge lines; always healthy.
    pub fn lines(lines: ExtraMetrics) -> Extras {
        Extras {
            lines,
            text: Arc::new(|_| {}),
            hops: Arc::new(Vec::new),
            unhealthy: Arc::new(|| None),
        }
    }
}

/// Binds the admin listener (so the caller learns the real port) and serves it on a thread.
pub fn start(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    extra: Extras,
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
    s: TcpStream,
    shards: &[Arc<ShardMetrics>],
    extra: &Extras,
    draining: &AtomicBool,
) -> std::io::Result<()> {
    let stopping = if draining.load(Ordering::Relaxed) {
        Some("draining")
    } else {
        (extra.unhealthy)()
    };
    let body = || {
        let mut out = render(shards, &(extra.lines)(), &(extra.hops)());
        (extra.text)(&mut out);
        out
    };
    iris_core::http::answer_admin(s, body, stopping)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn health_says_503_when_the_edge_cannot_accept_and_text_is_appended() {
        let failed = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&failed);
        let extras = Extras {
            lines: Arc::new(|| vec![("iris_x_total", "counter", "x", 3)]),
            text: Arc::new(|out| out.push_str("iris_hist_count{hop=\"a\"} 7\n")),
            hops: Arc::new(|| {
                let h = iris_bus::hops::HopHistogram::default();
                h.record_micros(700);
                vec![("produce_acked", h.snapshot())]
            }),
            unhealthy: Arc::new(move || f.load(Ordering::Relaxed).then_some("outbox_failed")),
        };
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            vec![Arc::new(ShardMetrics::default())],
            extras,
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        assert!(get(addr, "/health").starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics");
        assert!(m.contains("iris_x_total 3\n") && m.contains("iris_hist_count{hop=\"a\"} 7\n"));
        // One family for the shards' hops and the link's, with one header.
        assert_eq!(
            m.matches("# TYPE iris_edge_hop_seconds histogram").count(),
            1
        );
        assert!(m.contains("iris_edge_hop_seconds_count{hop=\"produce_acked\"} 1\n"));
        failed.store(true, Ordering::Relaxed);
        let h = get(addr, "/health");
        assert!(
            h.starts_with("HTTP/1.1 503") && h.ends_with("outbox_failed\n"),
            "{h}"
        );
    }
}
