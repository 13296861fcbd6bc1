//! One client connection of the load generator, speaking protocol v1 with the codec of
//! `iris_edge::protocol`, or protocol v2 ([`Protocol::V2`]) with the helpers of [`super::v2`].
//!
//! A [`Client`] owns a byte stream ([`super::transport::Stream`]: a glommio `TcpStream` with
//! `TCP_NODELAY`, or TLS / WebSocket on one with `--transport`), an input buffer that server
//! frames are decoded from in place, and the run's shared state. Reads and writes time out every
//! [`POLL`] so a blocked connection still notices the end of the run; [`Client::fill`] returns
//! `Ok(None)` on such a tick. Login follows the protocol: `0x01 user`, then wait for
//! `03 LOGIN_OK` (or the raw-text refusals `AUTH_FAILED` / `RATE_LIMITED`) before anything else.
//! In v2 the login is `HELLO` (token = the user name) and waits for `HELLO_OK`; `ERROR` or
//! `RATE_LIMITED` (login) is a refusal. With `--jwt-secret` ([`Tokens`]) both carry
//! `user:token` instead of the name.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use iris_edge::protocol::frame::{decode_server, ServerFrame, AUTH_FAILED, RATE_LIMITED_TEXT};
use iris_edge::protocol::{ClientFrame, MsgId, ProtoError, MSG_ID_LEN};

use super::clock;
use super::stats::Shared;
use super::transport::Stream;
use super::v2;

/// The client protocol a run speaks (`--protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `shared/PROTOCOL.md`.
    #[default]
    V1,
    /// `docs/PROTOCOL-v2.md`.
    V2,
}

/// `--jwt-secret`: HS256 tokens for the edge's `[auth]` (`iris_edge::auth::sign`), valid from
/// a minute before the run to a day after it.
#[derive(Debug, Clone)]
pub struct Tokens {
    secret: String,
    issuer: String,
    nbf_s: u64,
    exp_s: u64,
}

impl Tokens {
    pub fn new(secret: &str, issuer: &str) -> Self {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            secret: secret.to_owned(),
            issuer: issuer.to_owned(),
            nbf_s: now_s.saturating_sub(60),
            exp_s: now_s + 86_400,
        }
    }

    /// `user:token`, the body of a LOGIN (the token of a HELLO) with auth on.
    pub fn login_body(&self, user: &[u8]) -> Vec<u8> {
        let claims = serde_json::json!({
            "sub": String::from_utf8_lossy(user),
            "iss": self.issuer,
            "nbf": self.nbf_s,
            "exp": self.exp_s,
        });
        let token = iris_edge::auth::sign(self.secret.as_bytes(), &claims);
        let mut body = Vec::with_capacity(user.len() + 1 + token.len());
        body.extend_from_slice(user);
        body.push(b':');
        body.extend_from_slice(token.as_bytes());
        body
    }
}

/// Read/write timeout tick: how quickly a blocked connection notices the run is stopping.
pub const POLL: Duration = Duration::from_millis(100);
/// Longest wait for LOGIN_OK.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_SPARE: usize = 16 << 10;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connect to {addr}: {err}")]
    Connect { addr: SocketAddr, err: io::Error },
    #[error("handshake with {addr}: {err}")]
    Handshake { addr: SocketAddr, err: io::Error },
    #[error("login refused: {0}")]
    Refused(String),
    #[error("server error frame: {0}")]
    ServerError(String),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtoError),
    #[error("protocol v2: {0}")]
    Wire(#[from] iris_wire::v2::WireError),
    #[error("connection closed by the server")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("run stopped")]
    Stopped,
}

/// An input buffer that server frames are decoded from in place.
#[derive(Debug)]
pub struct RxBuf {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
}

impl Default for RxBuf {
    fn default() -> Self {
        Self::with_capacity(64 << 10)
    }
}

impl RxBuf {
    /// A buffer of `cap` bytes (it grows for frames larger than that).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: vec![0; cap.max(MIN_SPARE * 2)],
            head: 0,
            tail: 0,
        }
    }

    /// Bytes received and not consumed yet.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }

    /// Free space after the data (compacting or growing first if it is small).
    fn spare(&mut self) -> &mut [u8] {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
        if self.buf.len() - self.tail < MIN_SPARE {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
            if self.buf.len() - self.tail < MIN_SPARE {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        &mut self.buf[self.tail..]
    }

    /// Appends bytes (tests and fake servers).
    pub fn push(&mut self, bytes: &[u8]) {
        while self.spare().len() < bytes.len() {
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        self.buf[self.tail..self.tail + bytes.len()].copy_from_slice(bytes);
        self.tail += bytes.len();
    }

    /// Decodes the next complete server frame, consuming it.
    pub fn next_frame(&mut self) -> Result<Option<ServerFrame<'_>>, ProtoError> {
        let Self { buf, head, tail } = self;
        match decode_server(&buf[*head..*tail])? {
            Some((f, n)) => {
                *head += n;
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// Decodes the next complete protocol v2 server frame, consuming it.
    pub fn next_v2(&mut self) -> Result<Option<v2::In<'_>>, iris_wire::v2::WireError> {
        let Self { buf, head, tail } = self;
        match v2::next_frame(&buf[*head..*tail])? {
            Some((f, n)) => {
                *head += n;
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// Consumes `n` bytes (raw protocols such as the echo client).
    pub fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.tail);
    }
}

/// Appends the ACK of message `id` (`03` + the 16-byte id) to `out`.
pub fn push_ack(out: &mut Vec<u8>, id: &[u8]) {
    match MsgId::parse(id) {
        Some(id) => ClientFrame::Ack { id }.encode(out),
        // Not an Iris 2.0 id: echo it as received, as a v1 client would.
        None => {
            out.push(iris_edge::protocol::frame::op::ACK);
            out.extend_from_slice(id);
        }
    }
}

/// Length of an ACK frame on the wire.
pub const ACK_LEN: usize = 1 + MSG_ID_LEN;

/// One client connection.
#[derive(Debug)]
pub struct Client {
    pub stream: Stream,
    /// The socket under `stream` (for [`is_open`]); closed when `stream` is dropped.
    fd: RawFd,
    pub rx: RxBuf,
    /// The protocol this connection speaks (the run's).
    pub protocol: Protocol,
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to `addr` (within `timeout`), with `TCP_NODELAY` and the [`POLL`] timeouts,
    /// then does the run's TLS and WebSocket handshakes (within `timeout` again).
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        shared: Arc<Shared>,
    ) -> Result<Self, LoadError> {
        let connected = if shared.sources.is_empty() {
            TcpStream::connect_timeout(addr, timeout).await
        } else {
            let at = shared.next_source.fetch_add(1, Ordering::Relaxed);
            let source = SocketAddr::new(shared.sources[at % shared.sources.len()], 0);
            TcpStream::connect_timeout_from(source, addr, timeout).await
        };
        let stream = connected.map_err(|e| LoadError::Connect {
            addr,
            err: e.into(),
        })?;
        stream.set_nodelay(true).map_err(io::Error::from)?;
        stream
            .set_read_timeout(Some(POLL))
            .map_err(io::Error::from)?;
        stream
            .set_write_timeout(Some(POLL))
            .map_err(io::Error::from)?;
        let fd = stream.as_raw_fd();
        let stream = if shared.connector.kind == super::transport::TransportKind::Tcp {
            Stream::Tcp(stream)
        } else {
            let handshake = shared.connector.handshake(stream, addr);
            futures_lite::future::or(handshake, async {
                glommio::timer::sleep(timeout).await;
                Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
            })
            .await
            .map_err(|err| LoadError::Handshake { addr, err })?
        };
        Ok(Self {
            stream,
            fd,
            rx: RxBuf::with_capacity(32 << 10),
            protocol: shared.protocol,
            shared,
        })
    }

    /// Whether the run is stopping.
    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }

    /// Reads more bytes into [`Client::rx`]: `Ok(Some(n))` with `n > 0`, `Ok(None)` on a
    /// timeout tick; end of stream is [`LoadError::Closed`].
    pub async fn fill(&mut self) -> Result<Option<usize>, LoadError> {
        let spare = self.rx.spare();
        match self.stream.read(spare).await {
            Ok(0) => Err(LoadError::Closed),
            Ok(n) => {
                self.rx.tail += n;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes all of `buf`; gives up with [`LoadError::Stopped`] if the run stops while the
    /// socket is blocked.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), LoadError> {
        let mut pos = 0;
        while pos < buf.len() {
            match self.stream.write(&buf[pos..]).await {
                Ok(0) => return Err(LoadError::Closed),
                Ok(n) => pos += n,
                Err(e) if retryable(&e) => {
                    if self.stopping() {
                        return Err(LoadError::Stopped);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.stream.wrapped() {
            // TLS records and WebSocket messages wait in their library's buffer until a flush.
            loop {
                match self.stream.flush().await {
                    Ok(()) => break,
                    Err(e) if retryable(&e) => {
                        if self.stopping() {
                            return Err(LoadError::Stopped);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Sends LOGIN for `user` and waits for LOGIN_OK (v1; messages that arrive before it, only
    /// possible on a re-login, are acked and skipped), or HELLO and HELLO_OK (v2). With
    /// `--jwt-secret` the user's token is signed here: [`Client::login_with`] takes one signed
    /// before.
    pub async fn login(&mut self, user: &[u8]) -> Result<(), LoadError> {
        let body = self.shared.login_body(user);
        self.login_with(&body).await
    }

    /// [`Client::login`] with the LOGIN's (HELLO token's) whole body: a user, or `user:token`
    /// ([`Shared::login_body`]).
    pub async fn login_with(&mut self, body: &[u8]) -> Result<(), LoadError> {
        if self.protocol == Protocol::V2 {
            return self.hello(body).await;
        }
        let mut f = Vec::with_capacity(body.len() + 1);
        ClientFrame::Login { body }.encode(&mut f);
        self.write_all(&f).await?;
        self.await_login_ok().await
    }

    /// Waits for LOGIN_OK after a LOGIN was written.
    pub async fn await_login_ok(&mut self) -> Result<(), LoadError> {
        let deadline = clock::now_ns() + LOGIN_TIMEOUT.as_nanos() as u64;
        let mut acks = Vec::new();
        loop {
            let data = self.rx.data();
            for refusal in [AUTH_FAILED, RATE_LIMITED_TEXT] {
                if !data.is_empty() && refusal.starts_with(&data[..data.len().min(refusal.len())]) {
                    if data.len() >= refusal.len() {
                        return Err(LoadError::Refused(
                            String::from_utf8_lossy(refusal).into_owned(),
                        ));
                    }
                    break;
                }
            }
            let mut ok = false;
            loop {
                match self.rx.next_frame()? {
                    None => break,
                    Some(ServerFrame::LoginOk) => {
                        ok = true;
                        break;
                    }
                    Some(ServerFrame::Reliable { id, .. }) => push_ack(&mut acks, id),
                    Some(ServerFrame::Error { reason }) => {
                        return Err(LoadError::ServerError(
                            String::from_utf8_lossy(reason).into_owned(),
                        ))
                    }
                    Some(_) => {}
                }
            }
            if !acks.is_empty() {
                let a = std::mem::take(&mut acks);
                self.write_all(&a).await?;
            }
            if ok {
                return Ok(());
            }
            if self.stopping() {
                return Err(LoadError::Stopped);
            }
            if clock::now_ns() > deadline {
                return Err(LoadError::Timeout);
            }
            self.fill().await?;
        }
    }
}

/// A socket timeout (the stream's `POLL` read/write timeout) or an interrupted call: try again
/// unless the run is stopping.
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Client {
    /// Protocol v2 login: HELLO with `user` as the token, then wait for HELLO_OK. ERROR (e.g.
    /// `bad_token`) and RATE_LIMITED (login) are refusals. Frames after HELLO_OK (the drain)
    /// stay in [`Client::rx`].
    pub async fn hello(&mut self, user: &[u8]) -> Result<(), LoadError> {
        let mut f = Vec::with_capacity(64 + user.len());
        v2::push_hello(&mut f, user);
        self.write_all(&f).await?;
        let deadline = clock::now_ns() + LOGIN_TIMEOUT.as_nanos() as u64;
        loop {
            // Only HELLO_OK or a refusal may come first.
            if let Some(f) = self.rx.next_v2()? {
                use iris_wire::v2::{LimitedAction, ServerFrame as S};
                return match f {
                    v2::In::Other(S::HelloOk { .. }) => Ok(()),
                    v2::In::Other(S::Error { reason, .. }) => Err(LoadError::Refused(reason)),
                    v2::In::Other(S::RateLimited {
                        what: LimitedAction::Login,
                        ..
                    }) => Err(LoadError::Refused("rate_limited (login)".into())),
                    other => Err(LoadError::ServerError(format!(
                        "expected HELLO_OK, got {other:?}"
                    ))),
                };
            }
            if self.stopping() {
                return Err(LoadError::Stopped);
            }
            if clock::now_ns() > deadline {
                return Err(LoadError::Timeout);
            }
            self.fill().await?;
        }
    }
}

/// Whether the server still holds `c` open: a non-blocking peek sees neither end of stream nor
/// an error (bytes waiting to be read also count as open).
pub fn is_open(c: &Client) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: `c.fd` is the socket of `c.stream`, which is alive (and so the fd open) for the
    // whole call; recv writes at
    // most `b.len()` (1) bytes into `b`, which we own; MSG_PEEK leaves the data in the socket
    // and MSG_DONTWAIT keeps the call from blocking the executor.
    let n = unsafe {
        libc::recv(
            c.fd,
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return true;
    }
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_edge::protocol::frame::{encode_login_ok, encode_reliable};

    #[test]
    fn rxbuf_decodes_split_frames_and_grows() {
        let mut all = Vec::new();
        encode_login_ok(&mut all);
        let big = vec![7u8; 100_000];
        encode_reliable(&mut all, MsgId(5), &big);
        let mut rx = RxBuf::with_capacity(1024);
        let (a, b) = all.split_at(20);
        rx.push(&a[..5]);
        assert_eq!(rx.next_frame().unwrap(), None);
        rx.push(&a[5..]);
        assert_eq!(rx.next_frame().unwrap(), Some(ServerFrame::LoginOk));
        assert_eq!(rx.next_frame().unwrap(), None);
        rx.push(b);
        match rx.next_frame().unwrap() {
            Some(ServerFrame::Reliable { id, payload }) => {
                assert_eq!(id, b"0000000000000005");
                assert_eq!(payload.len(), 100_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.data().is_empty());
    }

    #[test]
    fn ack_bytes() {
        let mut out = Vec::new();
        push_ack(&mut out, b"00000000000000ff");
        assert_eq!(out, b"\x0300000000000000ff");
        assert_eq!(out.len(), ACK_LEN);
        out.clear();
        push_ack(&mut out, b"xyz");
        assert_eq!(out, b"\x03xyz");
    }
}
