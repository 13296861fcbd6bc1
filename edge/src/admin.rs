//! The admin HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! It runs on its own small OS thread, away from the shards, and only reads the shards'
//! counters (relaxed atomic loads), so a scrape never slows the data path. `/health` answers
//! `200 ok` while serving and `503 draining` once shutdown has begun.

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
    s: TcpStream,
    shards: &[Arc<ShardMetrics>],
    extra: &ExtraMetrics,
    draining: &AtomicBool,
) -> std::io::Result<()> {
    let stopping = draining.load(Ordering::Relaxed).then_some("draining");
    iris_core::http::answer_admin(s, || render(shards, &extra()), stopping)
}
