//! A TCP delay proxy: every chunk read on one side is written to the other side `delay` later,
//! in order, unchanged, in both directions. The multi-region benchmark puts it in front of the
//! global broker to play the distance between regions on one host (`iris-delay-proxy`).
//!
//! Plain threads: per connection, one reader and one writer per direction joined by a channel of
//! `(due, bytes)`; the writer sleeps until each chunk is due. A half-close is passed on after the
//! bytes before it (`shutdown(Write)` on the other side); an error on either side closes both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long the accept loop sleeps when nothing is pending (also the shutdown reaction time).
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Bytes read at once.
const CHUNK_BYTES: usize = 64 << 10;
/// How long connecting to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What to proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where every accepted connection is forwarded (`HOST:PORT`, resolved per connection).
    pub upstream: String,
    /// The delay added to every chunk in each direction.
    pub delay: Duration,
}

/// Counters of a running proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections whose upstream could not be reached.
    pub upstream_failed: AtomicU64,
    /// Bytes forwarded (both directions).
    pub bytes: AtomicU64,
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Accepting failed for another reason than a pending-nothing.
    #[error("accept failed: {0}")]
    Accept(io::Error),
}

/// Serves until `shutdown` is set: binds, calls `ready` with the bound address, then forwards
/// every accepted connection to the upstream with the delay. Open connections are closed when
/// the process exits.
pub fn run(
    cfg: &ProxyConfig,
    shutdown: &AtomicBool,
    stats: &Arc<ProxyStats>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ProxyError> {
    let listener = TcpListener::bind(cfg.listen).map_err(|source| ProxyError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let bound = listener.local_addr().map_err(ProxyError::Accept)?;
    listener.set_nonblocking(true).map_err(ProxyError::Accept)?;
    ready(bound);
    while !shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, peer)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let cfg = cfg.clone();
                let stats = stats.clone();
                let spawned = std::thread::Builder::new()
                    .name("proxy-conn".to_owned())
                    .spawn(move || connect_and_pipe(client, peer, &cfg, &stats));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProxyError::Accept(e)),
        }
    }
    Ok(())
}

fn connect_upstream(upstream: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "upstream resolves to nothing");
    for addr in upstream.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn connect_and_pipe(
    client: TcpStream,
    peer: SocketAddr,
    cfg: &ProxyConfig,
    stats: &Arc<ProxyStats>,
) {
    // The listener is non-blocking; accepted sockets inherit nothing on Linux, but be explicit.
    let _ = client.set_nonblocking(false);
    let upstream = match connect_upstream(&cfg.upstream) {
        Ok(s) => s,
        Err(e) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, upstream = %cfg.upstream, error = %e, "upstream unreachable");
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = {
        let stats = stats.clone();
        let delay = cfg.delay;
        std::thread::Builder::new()
            .name("proxy-up".to_owned())
            .spawn(move || pipe(client, upstream, delay, &stats))
    };
    // The other direction runs on this thread.
    pipe(u2, c2, cfg.delay, stats);
    if let Ok(h) = up {
        let _ = h.join();
    }
    tracing::debug!(%peer, "connection closed");
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order. Returns when `from`
/// ends (after passing the half-close on) or either side fails (then both are shut down).
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, stats: &ProxyStats) {
    let (tx, rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    let (Ok(from2), Ok(to2)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let writer = std::thread::Builder::new()
        .name("proxy-write".to_owned())
        .spawn(move || {
            let mut to = to2;
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                match chunk {
                    Some(bytes) => {
                        if to.write_all(&bytes).is_err() {
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from2.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    None => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                }
            }
        });
    let Ok(writer) = writer else {
        return;
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send((Instant::now() + delay, None));
                break;
            }
            Ok(n) => {
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                if tx
                    .send((Instant::now() + delay, Some(buf[..n].to_vec())))
                    .is_err()
                {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // Closes the peer too; what was read before is still written (the writer
                // drains the channel first, then fails or ends on the closed socket).
                let _ = tx.send((Instant::now() + delay, None));
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.flush();
}
