//! The transport seam: how bytes reach the server. Plain TCP, TLS (rustls), WebSocket and
//! WebSocket over TLS (tungstenite) carry the same v2 frames.
//!
//! A connection is used by two threads (one reads, one writes) and closed from a third, so a
//! transport splits into a reading half, a writing half and a [`Closer`] that ends both.
//!
//! TCP splits for real (cloned sockets). A rustls stream or a tungstenite WebSocket is one
//! state machine that cannot be split, so those halves share it behind a mutex: the socket has
//! a short read timeout ([`POLL_READ`]), the reading half holds the lock for at most one such
//! read and steps aside while a writer waits, so a write waits at most one poll interval. A
//! read timeout is "try again" for both libraries: rustls keeps a partial TLS record in its
//! own buffer and tungstenite keeps a partial WebSocket frame in its read buffer, so no byte
//! is lost. A WebSocket ping is answered by tungstenite on the next read call (at most one
//! poll interval later); a close frame from the server reads as end of stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::{Message, WebSocket};

use crate::options::Transport as Choice;
use crate::ClientError;

/// How long the reading half of a TLS or WebSocket connection blocks in one socket read before
/// it lets a waiting writer have the stream.
pub(crate) const POLL_READ: Duration = Duration::from_millis(20);

/// Ends a connection: a blocked read returns EOF or an error, and writes fail.
pub(crate) trait Closer: Send + Sync {
    /// Closes both directions; idempotent.
    fn close(&self);
}

/// The two halves of a connection and its closer.
pub(crate) type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>, Arc<dyn Closer>);

impl Closer for TcpStream {
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// A transport choice made ready to connect: the TLS configuration is built once per client.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// The WebSocket request path, for WebSocket transports.
    ws_path: Option<String>,
}

/// Builds the rustls configuration trusting `roots` (the ring provider, TLS 1.2 and 1.3).
fn tls_config(
    server_name: &str,
    roots: &RootCertStore,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), ClientError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ClientError::Invalid(format!("tls server name {server_name:?}: {e}")))?;
    // The ring provider, as the edge uses (no post-quantum key exchange), offering X25519 first
    // (ring's default list starts with P-384, several times dearer for both ends).
    #[allow(deprecated)]
    let provider = {
        use rustls::crypto::ring::kx_group;
        let mut p = rustls::crypto::ring::default_provider();
        p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
        Arc::new(p)
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Invalid(format!("tls configuration: {e}")))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), name))
}

impl Connector {
    /// Checks the choice and builds its TLS configuration.
    pub(crate) fn new(choice: &Choice) -> Result<Connector, ClientError> {
        let (tls, ws_path) = match choice {
            Choice::Tcp => (None, None),
            Choice::Tls { server_name, roots } => (Some(tls_config(server_name, roots)?), None),
            Choice::Ws { path } => (None, Some(ws_path(path)?)),
            Choice::Wss {
                server_name,
                roots,
                path,
            } => (Some(tls_config(server_name, roots)?), Some(ws_path(path)?)),
        };
        Ok(Connector { tls, ws_path })
    }

    /// Connects to the first of `addrs` that accepts within `timeout`, then does the TLS
    /// handshake and the WebSocket upgrade (each within `timeout` of socket silence); writes
    /// blocked longer than `write_timeout` fail.
    pub(crate) fn connect(
        &self,
        addrs: &[SocketAddr],
        timeout: Duration,
        write_timeout: Duration,
    ) -> Result<Halves, ClientError> {
        let (stream, addr) = connect_tcp(addrs, timeout, write_timeout)?;
        let handshake_err = ClientError::Io;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(handshake_err)?;
        let closer = stream.try_clone().map_err(handshake_err)?;
        let halves: Halves = match (&self.tls, &self.ws_path) {
            (None, None) => {
                stream.set_read_timeout(None).map_err(handshake_err)?;
                let reader = stream.try_clone().map_err(handshake_err)?;
                return Ok((Box::new(reader), Box::new(stream), Arc::new(closer)));
            }
            (Some((config, name)), None) => {
                let tls = tls_handshake(stream, config, name, addr)?;
                closer.set_read_timeout(Some(POLL_READ))?;
                Shared::halves(Stream::Tls(Box::new(tls)), closer)
            }
            (None, Some(path)) => {
                let url = format!("ws://{addr}{path}");
                let ws = ws_handshake(Box::new(stream) as Box<dyn Sock>, &url, addr)?;
                closer.set_read_timeout(Some(POLL_READ))?;
                Shared::halves(Stream::Ws(Box::new(ws), Vec::new()), closer)
            }
            (Some((config, name)), Some(path)) => {
                let tls = tls_handshake(stream, config, name, addr)?;
                let host = match name {
                    ServerName::DnsName(d) => format!("{}:{}", d.as_ref(), addr.port()),
                    _ => addr.to_string(),
                };
                let url = format!("wss://{host}{path}");
                let ws = ws_handshake(Box::new(tls) as Box<dyn Sock>, &url, addr)?;
                closer.set_read_timeout(Some(POLL_READ))?;
                Shared::halves(Stream::Ws(Box::new(ws), Vec::new()), closer)
            }
        };
        Ok(halves)
    }
}

/// A WebSocket request path: starts with `/`.
fn ws_path(path: &str) -> Result<String, ClientError> {
    if path.is_empty() {
        return Ok("/".to_owned());
    }
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ClientError::Invalid(format!(
            "websocket path {path:?} must start with '/' and hold no spaces"
        )));
    }
    Ok(path.to_owned())
}

/// Connects to the first of `addrs` that accepts within `timeout`.
fn connect_tcp(
    addrs: &[SocketAddr],
    timeout: Duration,
    write_timeout: Duration,
) -> Result<(TcpStream, SocketAddr), ClientError> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
                return Ok((stream, *addr));
            }
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect {
        addr: format!("{addrs:?}"),
        source: last,
    })
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// The TLS handshake; a certificate the roots do not trust is [`ClientError::Tls`].
fn tls_handshake(
    sock: TcpStream,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    addr: SocketAddr,
) -> Result<TlsStream, ClientError> {
    let conn =
        ClientConnection::new(config.clone(), name.clone()).map_err(|e| ClientError::Tls {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            return Err(ClientError::Tls {
                addr: addr.to_string(),
                reason: e.to_string(),
            });
        }
    }
    Ok(s)
}

/// A byte stream a WebSocket runs over (TCP or TLS).
trait Sock: Read + Write + Send {}
impl<T: Read + Write + Send> Sock for T {}

type Ws = WebSocket<Box<dyn Sock>>;

/// The WebSocket upgrade; a refused upgrade is [`ClientError::WebSocket`].
fn ws_handshake(sock: Box<dyn Sock>, url: &str, addr: SocketAddr) -> Result<Ws, ClientError> {
    match tungstenite::client(url, sock) {
        Ok((ws, _response)) => Ok(ws),
        Err(e) => Err(ClientError::WebSocket {
            addr: addr.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// A stream the two halves share.
enum Stream {
    Tls(Box<TlsStream>),
    /// The WebSocket and the unread rest of the last binary message.
    Ws(Box<Ws>, Vec<u8>),
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A tungstenite error as an I/O error; a closed WebSocket is `None` (end of stream).
fn ws_io(e: tungstenite::Error) -> Option<io::Error> {
    match e {
        tungstenite::Error::Io(e) => Some(e),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => None,
        other => Some(io::Error::other(other.to_string())),
    }
}

impl Stream {
    /// One read attempt: `Err` with a timeout kind when nothing came within [`POLL_READ`].
    fn read_once(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tls(s) => s.read(buf),
            Stream::Ws(ws, rest) => loop {
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    rest.drain(..n);
                    return Ok(n);
                }
                match ws.read() {
                    Ok(Message::Binary(b)) => rest.extend_from_slice(&b),
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                    Ok(Message::Close(_)) => return Ok(0),
                    Ok(Message::Text(_)) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "websocket text message (v2 travels in binary messages)",
                        ))
                    }
                    Err(e) => return ws_io(e).map_or(Ok(0), Err),
                }
            },
        }
    }

    /// Writes `bytes`: TLS as they are; WebSocket one complete v2 frame per binary message
    /// (a partial frame waits in `pending` for the rest).
    fn write_all(&mut self, bytes: &[u8], pending: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.write_all(bytes),
            Stream::Ws(ws, _) => {
                pending.extend_from_slice(bytes);
                let mut at = 0;
                while let Some(len) = pending.get(at..at + 4) {
                    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                    let end = at + 4 + len;
                    if end > pending.len() {
                        break;
                    }
                    ws.write(Message::binary(pending[at..end].to_vec()))
                        .map_err(|e| ws_io(e).unwrap_or_else(closed))?;
                    at = end;
                }
                pending.drain(..at);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            Stream::Ws(ws, _) => ws.flush().map_err(|e| ws_io(e).unwrap_or_else(closed)),
        }
    }

    /// Best effort goodbye: TLS close_notify or a WebSocket close frame.
    fn goodbye(&mut self) {
        match self {
            Stream::Tls(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            Stream::Ws(ws, _) => {
                let _ = ws.close(None);
                let _ = ws.flush();
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
}

/// A TLS or WebSocket stream shared by the reading and writing halves.
struct Shared {
    stream: Mutex<Stream>,
    /// Writers waiting for the stream: the reader steps aside.
    writers: AtomicUsize,
    closed: AtomicBool,
    /// The TCP socket underneath, to end blocked reads and writes.
    sock: TcpStream,
}

impl Shared {
    fn halves(stream: Stream, sock: TcpStream) -> Halves {
        let shared = Arc::new(Shared {
            stream: Mutex::new(stream),
            writers: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            sock,
        });
        (
            Box::new(ReadHalf(shared.clone())),
            Box::new(WriteHalf {
                shared: shared.clone(),
                pending: Vec::new(),
            }),
            shared,
        )
    }

    fn lock(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection closed",
            ));
        }
        Ok(())
    }
}

impl Closer for Shared {
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // The reader steps aside; a writer blocked in a write keeps the lock (no goodbye
        // then). The goodbye never blocks: the socket turns non-blocking first.
        self.writers.fetch_add(1, Ordering::AcqRel);
        for _ in 0..50 {
            if let Ok(mut s) = self.stream.try_lock() {
                if self.sock.set_nonblocking(true).is_ok() {
                    s.goodbye();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.writers.fetch_sub(1, Ordering::AcqRel);
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

struct ReadHalf(Arc<Shared>);

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.0.check_open()?;
            while self.0.writers.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            match self.0.lock().read_once(buf) {
                Err(e) if timed_out(&e) => continue,
                other => return other,
            }
        }
    }
}

struct WriteHalf {
    shared: Arc<Shared>,
    /// WebSocket: the start of a v2 frame whose end has not been written yet.
    pending: Vec<u8>,
}

impl WriteHalf {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Stream, &mut Vec<u8>) -> io::Result<T>,
    ) -> io::Result<T> {
        self.shared.check_open()?;
        self.shared.writers.fetch_add(1, Ordering::AcqRel);
        let mut s = self.shared.lock();
        self.shared.writers.fetch_sub(1, Ordering::AcqRel);
        f(&mut s, &mut self.pending)
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with(|s, pending| s.write_all(buf, pending))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.with(|s, _| s.flush())
    }
}
