//! The reference echo server (`iris-echo`): the loopback ceiling of this machine.
//!
//! One glommio executor, pinned to one CPU, accepts TCP connections and writes back whatever
//! each read returned, nothing else. Driven by `iris-load echo` with 64-byte messages, one per
//! read (`--batch 1`) or eight per read (`--batch 8`), it measures how many round trips and
//! messages one core can move through the kernel's loopback in the same run as the server's
//! figures, so every throughput figure of the benchmark suite is reported beside it as a ratio.

use std::io;
use std::net::SocketAddr;

use anyhow::Context as _;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

/// How to run the echo server.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub listen: SocketAddr,
    /// CPU to pin the executor to (`None`: unbound).
    pub cpu: Option<usize>,
    /// Registered I/O memory of the executor, bytes.
    pub io_memory: usize,
    /// Read buffer per connection, bytes.
    pub read_buf: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cpu: None,
            io_memory: 256 << 10,
            read_buf: 64 << 10,
        }
    }
}

async fn echo_conn(mut s: TcpStream, buf_len: usize) -> io::Result<()> {
    s.set_nodelay(true).map_err(io::Error::from)?;
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

async fn accept_loop(cfg: EchoConfig, on_bound: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .map_err(io::Error::from)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    on_bound(listener.local_addr().map_err(io::Error::from)?);
    loop {
        match listener.accept().await {
            Ok(s) => {
                let len = cfg.read_buf;
                glommio::spawn_local(async move {
                    let _ = echo_conn(s, len).await;
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Runs the echo server until the process ends; `on_bound` gets the bound address first.
pub fn serve(
    cfg: EchoConfig,
    on_bound: impl FnOnce(SocketAddr) + Send + 'static,
) -> anyhow::Result<()> {
    let placement = match cfg.cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    let h = LocalExecutorBuilder::new(placement)
        .name("iris-echo")
        .io_memory(cfg.io_memory)
        .spawn(move || accept_loop(cfg, on_bound))
        .map_err(io::Error::from)
        .context("cannot start the echo executor")?;
    h.join()
        .map_err(|e| anyhow::anyhow!("echo executor failed: {e}"))?
}
