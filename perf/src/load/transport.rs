//! The byte stream under a load connection (`--transport`): plain TCP, TLS, WebSocket or
//! WebSocket over TLS, for protocol v2 (docs/PROTOCOL-v2.md "Transports").
//!
//! - TLS: rustls (ring provider, as the edge; X25519 offered first, see [`provider`]) through
//!   `futures-rustls`, trusting the PEM certificates of `--ca` and checking the name
//!   `--server-name`.
//! - WebSocket: the client side of the upgrade by `async-tungstenite` (request `ws://NAME:PORT/`),
//!   with the edge's own adapter [`iris_edge::shard::transport::WsFrames`] and its limits
//!   ([`iris_edge::shard::transport::ws_config`]): each v2 frame written goes out as one binary
//!   message, and messages read are a byte stream again (any split).
//!
//! A [`Connector`] is built once per run; [`Connector::handshake`] turns each new TCP connection
//! into a [`Stream`] of the run's transport.
//!
//! **Ticks.** A plain TCP [`Stream`] keeps the behaviour of the load generator: the socket's
//! read and write timeouts ([`super::conn::POLL`]) end a blocked read or write with `TimedOut`,
//! which the connection takes as a tick (is the run stopping?). rustls and tungstenite would
//! take such an error as fatal (async-tungstenite ends the stream on any read error), so under
//! TLS and WebSocket the socket is wrapped in [`Ticking`], which turns the timeout into a
//! pending poll and raises a flag, which [`Stream`] turns back into `TimedOut`. Nothing
//! is lost: a partial TLS record or WebSocket frame stays in its library's buffer.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::client::TlsStream;
use glommio::net::TcpStream;
use iris_edge::shard::transport::{ws_config, WsFrames};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// The transport a run's connections use (`--transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Plain TCP.
    #[default]
    Tcp,
    /// TLS (`iris-edge --listen-v2-tls`).
    Tls,
    /// WebSocket, `ws://` (`iris-edge --listen-v2-ws`).
    Ws,
    /// WebSocket over TLS, `wss://` (`iris-edge --listen-v2-wss`).
    Wss,
}

impl TransportKind {
    /// Whether the transport runs TLS.
    pub fn tls(self) -> bool {
        matches!(self, TransportKind::Tls | TransportKind::Wss)
    }

    /// Whether the transport runs WebSocket.
    pub fn ws(self) -> bool {
        matches!(self, TransportKind::Ws | TransportKind::Wss)
    }
}

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("--transport {0:?} needs --ca FILE (the PEM certificate to trust)")]
    NoCa(TransportKind),
    #[error("read --ca {path}: {err}")]
    ReadCa { path: String, err: io::Error },
    #[error("--ca {0}: no PEM certificate in it")]
    EmptyCa(String),
    #[error("--ca {path}: {err}")]
    BadCa { path: String, err: String },
    #[error("--server-name {0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("tls configuration: {0}")]
    Config(String),
}

/// tungstenite's read buffer of the load generator's WebSocket clients (the edge's is
/// `[v2] ws_read_buffer_bytes`): their memory is not what is measured.
const WS_READ_BUFFER_BYTES: u32 = 4096;

/// A transport made ready to connect: the TLS configuration is built once per run.
#[derive(Debug)]
pub struct Connector {
    pub kind: TransportKind,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// `--tls-clients`: configurations with a session cache each, used in turn (empty: `tls`'s
    /// for every connection).
    clients: Vec<Arc<ClientConfig>>,
    next_client: std::sync::atomic::AtomicUsize,
    /// Host name of the WebSocket request (`Host:` header).
    server_name: String,
}

impl Default for Connector {
    fn default() -> Self {
        Self::tcp()
    }
}

/// The trust store of the PEM certificates in `pem` (`path` names it in errors).
pub fn roots_from_pem(pem: &[u8], path: &str) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TransportError::BadCa {
            path: path.into(),
            err: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TransportError::BadCa {
            path: path.into(),
            err: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TransportError::EmptyCa(path.into()));
    }
    Ok(roots)
}

/// The ring provider (as the edge uses) offering X25519 first, as browsers and most TLS clients
/// do: rustls's ring defaults put P-384 first, whose key exchange costs the server about 1 ms of
/// CPU per handshake in ring (BENCHMARKS.md, "v2 transports: cost per message and per
/// connection"), so a client sending a P-384 key share would measure that instead.
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::kx_group;
    #[allow(deprecated)] // ring lacks post-quantum key exchange; chosen to avoid building aws-lc
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

impl Connector {
    /// Plain TCP.
    pub fn tcp() -> Self {
        Self {
            kind: TransportKind::Tcp,
            tls: None,
            clients: Vec::new(),
            next_client: Default::default(),
            server_name: "localhost".into(),
        }
    }

    /// A connector for `kind`; TLS trusts the PEM certificates of the file `ca` and checks
    /// `server_name` (also the WebSocket request's host).
    pub fn new(
        kind: TransportKind,
        ca: Option<&std::path::Path>,
        server_name: &str,
    ) -> Result<Self, TransportError> {
        let tls = if kind.tls() {
            let ca = ca.ok_or(TransportError::NoCa(kind))?;
            let path = ca.display().to_string();
            let pem = std::fs::read(ca).map_err(|err| TransportError::ReadCa {
                path: path.clone(),
                err,
            })?;
            let roots = roots_from_pem(&pem, &path)?;
            let name = ServerName::try_from(server_name.to_owned())
                .map_err(|_| TransportError::BadServerName(server_name.into()))?;
            let provider = Arc::new(provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| TransportError::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some((Arc::new(config), name))
        } else {
            None
        };
        Ok(Self {
            kind,
            tls,
            clients: Vec::new(),
            next_client: Default::default(),
            server_name: server_name.into(),
        })
    }

    /// Gives TLS connections `n` clients with a session cache each, used in turn (`n` ≤ 1: one
    /// shared client, as built).
    pub fn with_tls_clients(mut self, n: usize) -> Self {
        if let (Some((config, _)), true) = (&self.tls, n > 1) {
            self.clients = (0..n)
                .map(|_| {
                    let mut c = ClientConfig::clone(config);
                    c.resumption = rustls::client::Resumption::in_memory_sessions(1);
                    Arc::new(c)
                })
                .collect();
        }
        self
    }

    /// The TLS configuration of the next connection.
    fn client(&self, shared: &Arc<ClientConfig>) -> Arc<ClientConfig> {
        if self.clients.is_empty() {
            return shared.clone();
        }
        let at = self
            .next_client
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.clients[at % self.clients.len()].clone()
    }

    /// Does the handshakes of this transport on a connected socket (which has its read and
    /// write timeouts set); the caller bounds the time.
    pub async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> io::Result<Stream> {
        if self.kind == TransportKind::Tcp {
            return Ok(Stream::Tcp(tcp));
        }
        let tick = Rc::new(Cell::new(false));
        let sock = Ticking {
            s: tcp,
            tick: tick.clone(),
        };
        let url = format!(
            "{}://{}:{}/",
            if self.kind.tls() { "wss" } else { "ws" },
            self.server_name,
            addr.port()
        );
        let ws_err = |e: async_tungstenite::tungstenite::Error| {
            io::Error::other(format!("websocket upgrade: {e}"))
        };
        let max = u32::try_from(super::v2::MAX_FRAME).unwrap_or(u32::MAX);
        let ws = ws_config(max, WS_READ_BUFFER_BYTES);
        let inner = match (&self.tls, self.kind) {
            (None, TransportKind::Ws) => {
                let (ws, _) = async_tungstenite::client_async_with_config(url, sock, Some(ws))
                    .await
                    .map_err(ws_err)?;
                Inner::Ws(Box::new(WsFrames::new(ws)))
            }
            (Some((config, name)), kind) => {
                let tls = futures_rustls::TlsConnector::from(self.client(config))
                    .connect(name.clone(), sock)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("tls handshake: {e}")))?;
                if kind == TransportKind::Wss {
                    let (ws, _) = async_tungstenite::client_async_with_config(url, tls, Some(ws))
                        .await
                        .map_err(ws_err)?;
                    Inner::Wss(Box::new(WsFrames::new(ws)))
                } else {
                    Inner::Tls(Box::new(tls))
                }
            }
            (None, _) => return Err(io::Error::other("tls transport without a configuration")),
        };
        tick.set(false);
        Ok(Stream::Wrapped { inner, tick })
    }
}

/// A TCP socket whose read and write timeouts become a pending poll and a raised flag (see the
/// module doc), for the libraries that take any error as fatal.
pub struct Ticking {
    s: TcpStream,
    tick: Rc<Cell<bool>>,
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Ticking {
    /// A timeout of the socket: flag it, and have the task polled again (the caller gives up
    /// on this poll when it sees the flag; a library in a handshake polls the socket again,
    /// which arms a new timeout).
    fn tick<T>(&self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        self.tick.set(true);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl AsyncRead for Ticking {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.s).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if timed_out(&e) => this.tick(cx),
            other => other,
        }
    }
}

impl AsyncWrite for Ticking {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.s).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if timed_out(&e) => this.tick(cx),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.s).poll_flush(cx) {
            Poll::Ready(Err(e)) if timed_out(&e) => this.tick(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().s).poll_close(cx)
    }
}

/// TLS, WebSocket or both over a [`Ticking`] socket.
pub enum Inner {
    Tls(Box<TlsStream<Ticking>>),
    Ws(Box<WsFrames<Ticking>>),
    Wss(Box<WsFrames<TlsStream<Ticking>>>),
}

/// A connection's byte stream.
pub enum Stream {
    /// Plain TCP: timeouts surface as `TimedOut` errors.
    Tcp(TcpStream),
    /// TLS and/or WebSocket: timeouts raise `tick`, read back as `TimedOut`.
    Wrapped { inner: Inner, tick: Rc<Cell<bool>> },
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Tcp(_) => "Stream::Tcp",
            Stream::Wrapped {
                inner: Inner::Tls(_),
                ..
            } => "Stream::Tls",
            Stream::Wrapped {
                inner: Inner::Ws(_),
                ..
            } => "Stream::Ws",
            Stream::Wrapped {
                inner: Inner::Wss(_),
                ..
            } => "Stream::Wss",
        })
    }
}

/// Socket timeout of a wrapped stream, as the error a plain TCP stream gives.
fn tick_error() -> io::Error {
    io::Error::from(io::ErrorKind::TimedOut)
}

impl Stream {
    /// Whether a TLS or WebSocket layer runs on the socket (writes then need a flush).
    pub fn wrapped(&self) -> bool {
        matches!(self, Stream::Wrapped { .. })
    }
}

/// A pending poll of a wrapped stream whose socket timed out becomes a `TimedOut` error, as a
/// plain TCP stream gives.
fn ticked<T>(tick: &Cell<bool>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    match poll {
        Poll::Pending if tick.replace(false) => Poll::Ready(Err(tick_error())),
        other => other,
    }
}

impl AsyncRead for Inner {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Inner::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Inner::Ws(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Inner::Wss(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Inner {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Inner::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Inner::Ws(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Inner::Wss(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Inner::Ws(s) => Pin::new(&mut **s).poll_flush(cx),
            Inner::Wss(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Tls(s) => Pin::new(&mut **s).poll_close(cx),
            Inner::Ws(s) => Pin::new(&mut **s).poll_close(cx),
            Inner::Wss(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Wrapped { inner, tick } => ticked(tick, Pin::new(inner).poll_read(cx, buf)),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Wrapped { inner, tick } => ticked(tick, Pin::new(inner).poll_write(cx, buf)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Wrapped { inner, tick } => ticked(tick, Pin::new(inner).poll_flush(cx)),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_close(cx),
            Stream::Wrapped { inner, tick } => ticked(tick, Pin::new(inner).poll_close(cx)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_needs_a_readable_ca_with_certificates() {
        assert!(matches!(
            Connector::new(TransportKind::Tls, None, "localhost"),
            Err(TransportError::NoCa(TransportKind::Tls))
        ));
        assert!(matches!(
            Connector::new(
                TransportKind::Wss,
                Some(std::path::Path::new("/nonexistent/ca.pem")),
                "localhost"
            ),
            Err(TransportError::ReadCa { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        assert!(matches!(
            Connector::new(TransportKind::Tls, Some(&junk), "localhost"),
            Err(TransportError::EmptyCa(_))
        ));
        // Plain and WebSocket need no CA.
        for k in [TransportKind::Tcp, TransportKind::Ws] {
            assert_eq!(Connector::new(k, None, "localhost").unwrap().kind, k);
        }
        assert!(TransportKind::Wss.tls() && TransportKind::Wss.ws());
        assert!(!TransportKind::Tls.ws() && !TransportKind::Ws.tls());
    }
}
