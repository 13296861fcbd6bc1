//! The byte stream under a connection: plain TCP, TLS, WebSocket or WebSocket over TLS
//! (docs/PROTOCOL-v2.md "Transports"). [`Transport`] implements `futures_lite::{AsyncRead,
//! AsyncWrite}`, so `conn::run` reads and writes every transport the same way; the v2 decoder
//! never knows which one it is on.
//!
//! - TLS ([`TlsConn`], `tls_conn.rs`): rustls (ring provider) on its unbuffered API, with the
//!   certificate current when the connection was accepted (`crate::tls`); an idle session holds
//!   no buffer. A write encrypts and sends what the socket takes; the connection's
//!   `poll_flush` after its writes pushes out the rest.
//! - WebSocket ([`WsFrames`]): the server side of the upgrade by `async-tungstenite`. Reading
//!   yields the bytes of binary messages in order (v2 frames are self-delimiting, so a frame
//!   split over messages, or several in one, decode the same); writing cuts the output at frame
//!   boundaries (the 4-byte length) and sends each v2 frame as one binary message. Pings are
//!   answered by tungstenite on the next read, a close frame is answered and ends the stream, a
//!   text message is answered with a close frame of code 1003 and ends it (1009 for a message
//!   over `max_frame_bytes` + 4, 1002 for a WebSocket protocol error).
//!
//! The handshakes run in their own task per connection ([`accept`]), bounded by
//! `login_timeout_ms`, so a slow client never holds up the accept loop.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncRead, AsyncWrite, Stream};
use futures_sink::Sink;
use glommio::net::TcpStream;
use rustls::ServerConfig;

use super::tls_conn::TlsConn;
use crate::tls::TlsCerts;

/// Which transport a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// The v2 transport listeners of one shard beyond plain TCP (`[v2] tls_listen`, `ws_listen`,
/// `wss_listen`), and the certificate they share.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tls: Option<OwnedFd>,
    pub ws: Option<OwnedFd>,
    pub wss: Option<OwnedFd>,
    /// Set when `tls` or `wss` is.
    pub certs: Option<Arc<TlsCerts>>,
}

/// A connection's byte stream once its handshakes are done.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsConn<TcpStream>>),
    Ws(Box<WsFrames<TcpStream>>),
    Wss(Box<WsFrames<TlsConn<TcpStream>>>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp(_) => "Transport::Tcp",
            Transport::Tls(_) => "Transport::Tls",
            Transport::Ws(_) => "Transport::Ws",
            Transport::Wss(_) => "Transport::Wss",
        })
    }
}

impl From<TcpStream> for Transport {
    fn from(s: TcpStream) -> Self {
        Transport::Tcp(s)
    }
}

/// Why a connection's handshake failed; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("tls handshake failed: {0}")]
    Tls(io::Error),
    #[error("websocket upgrade failed: {0}")]
    Ws(WsError),
    #[error("tls handshake timed out")]
    TlsTimeout,
    #[error("websocket upgrade timed out")]
    WsTimeout,
    #[error("no tls certificate loaded")]
    NoCertificate,
}

impl HandshakeError {
    /// Whether the TLS layer failed (else the WebSocket upgrade).
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            HandshakeError::Tls(_) | HandshakeError::TlsTimeout | HandshakeError::NoCertificate
        )
    }
}

/// The WebSocket limits of a v2 connection: one message holds one frame of at most
/// `max_frame_bytes` (plus its 4 length bytes); small buffers, since most connections idle
/// (`read_buffer_bytes`: tungstenite's read buffer, kept for the connection's life; its default
/// is 128 KiB).
pub fn ws_config(max_frame_bytes: u32, read_buffer_bytes: u32) -> WebSocketConfig {
    let max = max_frame_bytes as usize + 4;
    WebSocketConfig::default()
        .read_buffer_size(read_buffer_bytes as usize)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Outgoing messages are gathered up to this before a socket write (flushed after every pass of
/// the connection's writes anyway).
const WS_WRITE_BUFFER_BYTES: usize = 16 << 10;

/// Reads of a closing WebSocket's leftover input per poll before it yields.
const DRAIN_READS_PER_POLL: usize = 64;

/// Runs `fut` until `deadline`; `None` when it passed.
async fn within<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(left).await;
        None
    })
    .await
}

async fn tls_accept(
    stream: TcpStream,
    config: Option<Arc<ServerConfig>>,
    deadline: Instant,
) -> Result<TlsConn<TcpStream>, HandshakeError> {
    let config = config.ok_or(HandshakeError::NoCertificate)?;
    within(deadline, TlsConn::accept(stream, config))
        .await
        .ok_or(HandshakeError::TlsTimeout)?
        .map_err(HandshakeError::Tls)
}

async fn ws_accept<S>(
    stream: S,
    config: WebSocketConfig,
    deadline: Instant,
) -> Result<WsFrames<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = within(
        deadline,
        async_tungstenite::accept_async_with_config(stream, Some(config)),
    )
    .await
    .ok_or(HandshakeError::WsTimeout)?
    .map_err(HandshakeError::Ws)?;
    Ok(WsFrames::new(ws))
}

/// Does the handshakes `kind` needs on an accepted socket, all within `timeout`.
pub async fn accept(
    stream: TcpStream,
    kind: Kind,
    tls: Option<Arc<ServerConfig>>,
    ws: WebSocketConfig,
    timeout: Duration,
) -> Result<Transport, HandshakeError> {
    let deadline = Instant::now() + timeout;
    Ok(match kind {
        Kind::Tcp => Transport::Tcp(stream),
        Kind::Tls => Transport::Tls(Box::new(tls_accept(stream, tls, deadline).await?)),
        Kind::Ws => Transport::Ws(Box::new(ws_accept(stream, ws, deadline).await?)),
        Kind::Wss => {
            let tls = tls_accept(stream, tls, deadline).await?;
            Transport::Wss(Box::new(ws_accept(tls, ws, deadline).await?))
        }
    })
}

impl Transport {
    /// Whether its TLS handshake resumed a session (a ticket) instead of a full handshake.
    pub fn tls_resumed(&self) -> bool {
        match self {
            Transport::Tls(t) => t.resumed(),
            Transport::Wss(w) => w.get_ref().resumed(),
            Transport::Tcp(_) | Transport::Ws(_) => false,
        }
    }

    /// Ends the session politely before the socket closes: a WebSocket close frame, a TLS
    /// close_notify; at most `timeout`. Nothing for plain TCP.
    pub async fn finish(&mut self, timeout: Duration) {
        if matches!(self, Transport::Tcp(_)) {
            return;
        }
        let close = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_close(cx));
        let _ = within(Instant::now() + timeout, close).await;
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Transport::Ws(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Transport::Wss(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Transport::Ws(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Transport::Wss(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Transport::Ws(s) => Pin::new(&mut **s).poll_flush(cx),
            Transport::Wss(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_close(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_close(cx),
            Transport::Ws(s) => Pin::new(&mut **s).poll_close(cx),
            Transport::Wss(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// The server's close of a WebSocket: after a text message (1003), or at the session's end (1000).
enum Closing {
    Send(CloseFrame),
    Flush,
    Done,
}

/// A v2 byte stream over a WebSocket: binary messages in, one binary message per frame out.
pub struct WsFrames<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    input: Bytes,
    /// The start of an outgoing frame whose end has not been written yet.
    partial: Vec<u8>,
    closing: Option<Closing>,
}

impl<S> WsFrames<S> {
    /// Wraps a WebSocket whose handshake is done, on either side (the edge's accepted
    /// connections; `iris-load` uses it for its client connections).
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            input: Bytes::new(),
            partial: Vec::new(),
            closing: None,
        }
    }
}

/// The whole size (length field included) of the frame `b` starts with, once its length is in.
fn frame_size(b: &[u8]) -> Option<usize> {
    let len: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(4 + u32::from_be_bytes(len) as usize)
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsFrames<S> {
    /// The stream under the WebSocket.
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }

    /// Drives the close started by a text message or the session's end; ready once the close
    /// frame is sent (or cannot be: the peer closed first, or the socket failed).
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.closing.take() {
                Some(Closing::Send(frame)) => match Pin::new(&mut self.ws).poll_ready(cx) {
                    Poll::Pending => {
                        self.closing = Some(Closing::Send(frame));
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => {
                        let sent = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
                        self.closing = Some(if sent.is_ok() {
                            Closing::Flush
                        } else {
                            Closing::Done
                        });
                    }
                    Poll::Ready(Err(_)) => self.closing = Some(Closing::Done),
                },
                Some(Closing::Flush) => match Pin::new(&mut self.ws).poll_flush(cx) {
                    Poll::Pending => {
                        self.closing = Some(Closing::Flush);
                        return Poll::Pending;
                    }
                    Poll::Ready(_) => self.closing = Some(Closing::Done),
                },
                Some(Closing::Done) | None => {
                    self.closing = Some(Closing::Done);
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsFrames<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if !this.input.is_empty() {
                let n = buf.len().min(this.input.len());
                buf[..n].copy_from_slice(&this.input[..n]);
                let _ = this.input.split_to(n);
                return Poll::Ready(Ok(n));
            }
            if this.closing.is_some() {
                ready!(this.poll_closing(cx));
                return Poll::Ready(Ok(0));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Binary(b))) => this.input = b,
                Some(Ok(Message::Text(_))) => {
                    this.closing = Some(Closing::Send(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "v2 frames travel in binary messages".into(),
                    }));
                }
                // A ping's pong is queued by tungstenite and sent by the next poll; a close
                // frame's answer likewise, after which the stream ends (`None`).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => {}
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(0))
                }
                // The peer broke the WebSocket rules: tell it why in the close frame.
                Some(Err(e @ (WsError::Capacity(_) | WsError::Protocol(_)))) => {
                    let code = if matches!(e, WsError::Capacity(_)) {
                        CloseCode::Size
                    } else {
                        CloseCode::Protocol
                    };
                    this.closing = Some(Closing::Send(CloseFrame {
                        code,
                        reason: "".into(),
                    }));
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsFrames<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.closing.is_some() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket closing",
            )));
        }
        if let Err(e) = ready!(Pin::new(&mut this.ws).poll_ready(cx)) {
            return Poll::Ready(Err(ws_io(e)));
        }
        // The common case: a whole frame at the head of the output.
        let mut frame = None;
        let mut used = 0;
        if this.partial.is_empty() {
            if let Some(size) = frame_size(buf).filter(|&s| s <= buf.len()) {
                frame = Some(buf[..size].to_vec());
                used = size;
            }
        }
        if frame.is_none() {
            let want = match frame_size(&this.partial) {
                Some(size) => size - this.partial.len(),
                None => 4 - this.partial.len(),
            };
            used = want.min(buf.len());
            this.partial.extend_from_slice(&buf[..used]);
            if frame_size(&this.partial) == Some(this.partial.len()) {
                frame = Some(std::mem::take(&mut this.partial));
            }
        }
        if let Some(frame) = frame {
            Pin::new(&mut this.ws)
                .start_send(Message::Binary(frame.into()))
                .map_err(ws_io)?;
        }
        Poll::Ready(Ok(used))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_io)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The server ends the session: a close frame with code 1000 (none if the peer's close
        // or a text message's 1003 already went out), then the socket closes.
        let this = self.get_mut();
        if this.closing.is_none() {
            this.closing = Some(Closing::Send(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }));
        }
        ready!(this.poll_closing(cx));
        // Then read and drop what the peer still sends (its close frame, the rest of an
        // oversized message) until it closes: closing a socket with unread input resets the
        // connection, which can destroy our close frame before the peer reads it. Bounded by
        // the caller's timeout (`Transport::finish`); yields now and then so the timer runs.
        let mut sink = [0u8; 4096];
        for _ in 0..DRAIN_READS_PER_POLL {
            match ready!(Pin::new(this.ws.get_mut()).poll_read(cx, &mut sink)) {
                Ok(0) | Err(_) => return Poll::Ready(Ok(())),
                Ok(_) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{self, Write};
    use std::net::Shutdown;
    use std::sync::Arc;
    use std::time::Duration;

    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::os::fd::{AsRawFd, FromRawFd};

    use glommio::net::TcpListener;
    use glommio::{LocalExecutorBuilder, Placement};

    use super::frame_size;

    /// Runs `f` on a glommio executor sized to fit an 8 MiB memlock limit.
    pub(crate) fn on_executor<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(256 << 10)
            .ring_depth(64)
            .spawn(f)
            .expect("start an executor")
            .join()
            .expect("the executor's task");
    }

    /// Reads from `s` until `want` bytes came or the read waits longer than 2 s.
    async fn read_within(s: &mut glommio::net::TcpStream, buf: &mut [u8]) -> Option<usize> {
        glommio::timer::timeout(Duration::from_secs(2), async {
            Ok(s.read(buf).await.expect("read"))
        })
        .await
        .ok()
    }

    /// The plain TCP transport is glommio's stream with one multishot read poll
    /// (vendor/glommio/IRIS-PATCH.md 3). Data and the peer's FIN that arrive before the shard
    /// looks give readiness events that the reactor has reaped by the time the connection
    /// reads: the read takes the data short, and the next read must still see the end (the
    /// FIN posts no event after it). Before the fix it waited forever, and a session whose
    /// last frame came right before its close stayed open (seen under load in the v2 tests).
    #[test]
    fn data_and_the_fin_reaped_together_still_end_the_stream() {
        on_executor(|| async {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut client = std::net::TcpStream::connect(addr).expect("connect");
            let mut server = listener.accept().await.expect("accept");
            client.write_all(b"last frame").expect("write");
            client.shutdown(Shutdown::Write).expect("shutdown");
            // Let the reactor reap both events before anything reads.
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let mut buf = [0u8; 64];
            assert_eq!(read_within(&mut server, &mut buf).await, Some(10));
            assert_eq!(&buf[..10], b"last frame");
            assert_eq!(
                read_within(&mut server, &mut buf).await,
                Some(0),
                "the end of the stream was not seen"
            );
            // A FIN that comes after the data was read posts its own event.
            let mut client2 = std::net::TcpStream::connect(addr).expect("connect");
            let mut server2 = listener.accept().await.expect("accept");
            client2.write_all(b"one").expect("write");
            assert_eq!(read_within(&mut server2, &mut buf).await, Some(3));
            let pending = glommio::spawn_local(async move {
                let mut buf = [0u8; 8];
                read_within(&mut server2, &mut buf).await
            });
            glommio::timer::sleep(Duration::from_millis(20)).await;
            drop(client2);
            assert_eq!(pending.await, Some(0));
            drop(client);
        });
    }

    /// Data followed by a reset, both reaped before the read: the data, then the error.
    #[test]
    fn data_and_a_reset_reaped_together_still_fail_the_stream() {
        on_executor(|| async {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let client = std::net::TcpStream::connect(addr).expect("connect");
            let mut server = listener.accept().await.expect("accept");
            (&client).write_all(b"bye").expect("write");
            // SO_LINGER 0: close sends a RST.
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            drop(client);
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let mut buf = [0u8; 64];
            let first = glommio::timer::timeout(Duration::from_secs(2), async {
                Ok(server.read(&mut buf).await)
            })
            .await
            .expect("the first read waited");
            // Linux drops unread data on a reset: the read gives it or the error.
            if let Ok(n) = first {
                assert_eq!(&buf[..n], b"bye");
                let second = glommio::timer::timeout(Duration::from_secs(2), async {
                    Ok(server.read(&mut buf).await)
                })
                .await
                .expect("the end of the stream was not seen");
                assert!(matches!(second, Ok(0) | Err(_)), "{second:?}");
            }
        });
    }

    /// The edge's listeners (`server::bind_listener`) are non-blocking and set `TCP_NODELAY`:
    /// glommio patch 10 accepts from them with one `accept4` and returns the peer's address,
    /// and the accepted socket inherits `TCP_NODELAY` (the edge no longer sets it, nor asks
    /// `getpeername`). Both ways of accepting: a connection already waiting (the `accept4`),
    /// and none yet (io_uring's accept, which must wait, not fail, on a non-blocking listener).
    #[test]
    fn a_connection_accepted_from_the_edge_listener_has_nodelay_and_its_peer() {
        on_executor(|| async {
            let sock = crate::server::bind_listener("127.0.0.1:0".parse().unwrap()).expect("bind");
            let addr = sock.local_addr().unwrap().as_socket().unwrap();
            // SAFETY: `into_raw_fd` gives up the socket's single ownership and `from_raw_fd`
            // takes it: one owner closes the bound, listening descriptor.
            let listener =
                unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock)) };

            let client = std::net::TcpStream::connect(addr).expect("connect");
            glommio::timer::sleep(Duration::from_millis(20)).await;
            let (server, peer) = listener.accept_with_peer().await.expect("accept waiting");
            assert_eq!(peer, Some(client.local_addr().unwrap()));
            assert!(server.nodelay().unwrap(), "TCP_NODELAY not inherited");

            let waiting = glommio::spawn_local(async move {
                let r = glommio::timer::timeout(Duration::from_secs(2), async {
                    Ok(listener.accept_with_peer().await)
                })
                .await;
                r.expect("the accept did not wait for the connection")
            });
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let client2 = std::net::TcpStream::connect(addr).expect("connect");
            let (server2, peer2) = waiting.await.expect("accept by io_uring");
            assert_eq!(peer2, Some(client2.local_addr().unwrap()));
            assert!(server2.nodelay().unwrap(), "TCP_NODELAY not inherited");
            drop((client, client2, server, server2));
        });
    }

    /// Polls `t` once from the running task; true when it is pending.
    async fn poll_once(t: &mut glommio::timer::Timer) -> bool {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(
                std::future::Future::poll(std::pin::Pin::new(&mut *t), cx).is_pending(),
            )
        })
        .await
    }

    /// Awaits `t` within an outer 2 s bound and fails unless it fired by itself, well before
    /// that bound (a timeout's own firing polls the timer once more, which then finds it due).
    async fn fires_by_itself(t: &mut glommio::timer::Timer, what: &str) {
        let start = std::time::Instant::now();
        let _ =
            glommio::timer::timeout(Duration::from_secs(2), async { Ok((&mut *t).await) }).await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what} did not fire by itself ({:?})",
            start.elapsed()
        );
    }

    /// glommio patch 6: a pending timer polled again by its task leaves the reactor alone, so
    /// it must still fire when polled many times, and a timer reset after it fired (the reactor
    /// no longer holds it) must be registered again by its next poll.
    #[test]
    fn a_timer_polled_again_still_fires_and_a_reset_one_registers_again() {
        on_executor(|| async {
            let mut t = glommio::timer::Timer::new(Duration::from_millis(30));
            for _ in 0..1000 {
                assert!(poll_once(&mut t).await);
            }
            fires_by_itself(&mut t, "a timer polled 1000 times").await;
            // Fired and taken out of the reactor; reset, it must be registered anew.
            let mut t = glommio::timer::Timer::new(Duration::from_millis(5));
            poll_once(&mut t).await;
            glommio::timer::sleep(Duration::from_millis(30)).await;
            t.reset(Duration::from_millis(20));
            fires_by_itself(&mut t, "a timer reset after it fired").await;
        });
    }

    /// Bytes in `fd`'s socket queue: `SIOCOUTQ` (sent, not yet acknowledged) or `FIONREAD`
    /// (received, not yet read).
    fn queued(fd: std::os::fd::RawFd, request: libc::Ioctl) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: `fd` is an open socket for the whole call, and both requests write one
        // `c_int` through the pointer, which points at `n`, alive and writable.
        let r = unsafe { libc::ioctl(fd, request, &mut n as *mut libc::c_int) };
        assert_eq!(r, 0, "ioctl: {}", io::Error::last_os_error());
        usize::try_from(n).expect("a queue length")
    }

    /// A TLS client that never reads: what the edge's TLS layer holds beyond the two kernel
    /// queues (the edge's send queue, the client's receive queue) stays within one record's
    /// worth, so the rest of the output waits in the connection's accounted queue (64 KiB
    /// with rustls's buffered default).
    #[test]
    fn tls_output_to_a_reader_that_takes_nothing_stays_in_the_kernel_and_one_record() {
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::tls::write_cert(dir.path(), "edge");
        let config = Arc::new(crate::tls::load_server_config(&cert, &key).expect("config"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap())
            .unwrap();
        let client_config = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        on_executor(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let (inq_tx, inq_rx) = std::sync::mpsc::channel::<usize>();
            let client = std::thread::spawn(move || {
                let name = "localhost".try_into().unwrap();
                let conn = rustls::ClientConnection::new(client_config, name).unwrap();
                let sock = std::net::TcpStream::connect(addr).expect("connect");
                let mut tls = rustls::StreamOwned::new(conn, sock);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock).expect("handshake");
                }
                // Reads nothing more until the server is done writing.
                done_rx.recv().unwrap();
                inq_tx
                    .send(queued(tls.sock.as_raw_fd(), libc::FIONREAD))
                    .unwrap();
            });
            let stream = listener.accept().await.expect("accept");
            let ws = super::ws_config(1 << 16, 1024);
            let mut t = super::accept(
                stream,
                super::Kind::Tls,
                Some(config),
                ws,
                Duration::from_secs(5),
            )
            .await
            .expect("tls accept");
            let super::Transport::Tls(tls) = &t else {
                panic!("not tls")
            };
            let fd = tls.get_ref().as_raw_fd();
            // Write until the transport takes nothing for 200 ms.
            let chunk = vec![7u8; 16 << 10];
            let mut accepted = 0usize;
            let mut idle_since = std::time::Instant::now();
            while idle_since.elapsed() < Duration::from_millis(200) {
                match futures_lite::future::poll_once(t.write(&chunk)).await {
                    Some(n) => {
                        accepted += n.expect("write");
                        idle_since = std::time::Instant::now();
                    }
                    None => glommio::timer::sleep(Duration::from_millis(5)).await,
                }
            }
            let outq = queued(fd, libc::TIOCOUTQ);
            done_tx.send(()).unwrap();
            let inq = inq_rx.recv().unwrap();
            client.join().unwrap();
            // TLS 1.3 records of 16 KiB: 22 bytes of framing and tag each.
            let ciphertext = accepted + accepted.div_ceil(16 << 10) * 22;
            let held = ciphertext.saturating_sub(outq + inq);
            assert!(accepted > 256 << 10, "only {accepted} bytes written");
            assert!(
                held <= crate::shard::tls_conn::OUTPUT_LIMIT + (4 << 10),
                "the TLS layer holds {held} bytes ({accepted} accepted, {outq} in the send \
                 queue, {inq} in the receive queue)"
            );
        });
    }

    #[test]
    fn frame_size_reads_the_length_field() {
        assert_eq!(frame_size(&[0, 0, 0]), None);
        assert_eq!(frame_size(&[0, 0, 0, 5, 1]), Some(9));
        assert_eq!(frame_size(&[0, 0, 1, 0]), Some(260));
    }
}
